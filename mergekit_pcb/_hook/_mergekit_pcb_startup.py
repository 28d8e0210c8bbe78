"""Start-up hook that makes plain ``mergekit-yaml`` know ``merge_method: pcb``.

mergekit has no plugin entry points, so the ``pcb`` method must be registered in
every process that merges. ``mergekit_pcb_hook.pth`` imports this tiny module
when Python starts. It installs a one-shot import hook and nothing else: the
package itself (and torch) is imported only when ``mergekit.merge_methods`` is
first imported, right after which ``pcb`` is registered. Interpreter start-up
therefore pays for a few attribute look-ups, not for importing torch.

This file is installed at the top of site-packages (see pyproject.toml), so it
must not import anything beyond the standard library at module level. The package
imports it too, as ``mergekit_pcb._hook._mergekit_pcb_startup``, where no start-up
file ran (the checkout on ``PYTHONPATH``): the two copies are distinct modules, so a
hook is recognised by a marker attribute rather than by its class, and one is
installed at most.
"""

import sys

_TARGET = "mergekit.merge_methods"
_MARKER = "registers_mergekit_pcb"


class _RegisterPCBOnImport:
    """Meta-path finder that wraps the loader of ``mergekit.merge_methods``."""

    registers_mergekit_pcb = True

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        # One shot: remove ourselves first so the look-up below cannot recurse.
        _uninstall()
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def _register():
    method = sys.modules.get("mergekit_pcb.method")
    if method is not None and not hasattr(method, "register"):
        # Half imported: it imports mergekit's merge methods at its top, which is how we
        # got here, and registers ``pcb`` itself at its end.
        return
    try:
        from mergekit_pcb.method import register

        register()  # idempotent
    except Exception as error:  # never break mergekit because of the plugin
        import logging

        logging.getLogger("mergekit_pcb").warning(
            "mergekit-pcb could not register the 'pcb' merge method: %s", error
        )


def _uninstall():
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, _MARKER, False)]


def install():
    """Install the hook, or register at once if mergekit is already imported."""
    if _TARGET in sys.modules:
        _register()
    elif not any(getattr(f, _MARKER, False) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterPCBOnImport())


install()
