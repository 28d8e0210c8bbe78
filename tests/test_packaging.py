"""What the package carries and says: licence texts, metadata, install hints, the
changelog, and user-facing docs free of placeholders and of the project's internal
bookkeeping."""

from __future__ import annotations

import glob
import os
import re
import sys
from importlib import metadata

import pytest

import mergekit_pcb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts), encoding="utf-8") as file:
        return file.read()


@pytest.fixture(scope="module")
def project() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as file:
        return tomllib.load(file)["project"]


def test_license_is_the_lgpl_3_text_mergekit_ships(project):
    assert project["license"] == "LGPL-3.0-only"
    ours = _read("LICENSE")
    assert ours.lstrip().startswith("GNU LESSER GENERAL PUBLIC LICENSE\n")
    assert "Version 3, 29 June 2007" in ours.splitlines()[1]
    files = metadata.distribution("mergekit").files or []
    mergekit_license = next(f for f in files if f.name == "LICENSE" and "licenses" in str(f))
    assert ours == mergekit_license.read_text(encoding="utf-8")
    gpl = _read("COPYING")
    assert gpl.lstrip().startswith("GNU GENERAL PUBLIC LICENSE\n")
    assert "Version 3, 29 June 2007" in gpl.splitlines()[1]


def test_version_is_one_and_the_changelog_has_it(project):
    assert project["version"] == mergekit_pcb.__version__
    assert f"## [{mergekit_pcb.__version__}]" in _read("CHANGELOG.md")


def test_urls_are_real_addresses(project):
    for name, url in project["urls"].items():
        assert re.fullmatch(r"https://[\w.-]+/\S+", url), (name, url)


def test_install_hints_name_the_extras_requirements(project, monkeypatch):
    from mergekit_pcb.tune import cli as tune_cli
    from mergekit_pcb.tune import objectives
    from mergekit_pcb.tune.parallel import RAY_MISSING

    ray = project["optional-dependencies"]["ray"][0]
    lm_eval = project["optional-dependencies"]["lm-eval"][0]
    assert f"pip install '{ray}'" in RAY_MISSING
    workers = next(p for p in tune_cli.main.params if p.name == "workers")
    assert f"pip install '{ray}'" in (workers.help or "")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ImportError) as refused:
        objectives.LmEvalObjective(["my_val"])
    assert f"pip install '{lm_eval}'" in str(refused.value)


#: User-facing documents; CHANGELOG.md may name issues, the others may not.
DOCS = ["README.md", *glob.glob("docs/*.md", root_dir=REPO)]
DOCS += glob.glob("benchmarks/**/*.md", root_dir=REPO, recursive=True)
FORBIDDEN = [
    r"[Ii]ssues? \d",  # internal work items
    r"\bsessions?\b",  # how the project's work is organised
    r"REPO_URL",
    r"\.\./shared/|\bshared/",  # files outside the repository
]


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_docs_speak_of_the_project_alone(doc):
    text = _read(doc)
    for pattern in FORBIDDEN:
        found = re.search(pattern, text)
        assert found is None, f"{doc}: {found.group(0)!r}"


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_relative_links_lead_to_files(doc):
    text = _read(doc)
    folder = os.path.dirname(os.path.join(REPO, doc))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path = os.path.normpath(os.path.join(folder, target))
        assert os.path.exists(path), (doc, target)
