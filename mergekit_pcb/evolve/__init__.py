"""The evolver: a population of fine-tunes improved by mutation and crossover.

``offspring`` (tensor math: an offspring of two individuals and the seeded draws that
choose it), ``population`` (the individuals, where they live, offspring storage, model
folders), ``population_merge`` (mergekit glue: the config's merge of any population,
written into a live model), ``evolver`` (the search itself, over any scorer).
"""
