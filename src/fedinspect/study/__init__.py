"""Studies: a grid of federated runs (partitions x strategies x seeds x options) with statistics and a report.

``config`` reads STUDY.toml, ``runner`` runs (and resumes) the cells, ``statistics`` gives bootstrap
intervals and paired tests, ``pareto`` the trade-off frontiers, ``analysis`` turns finished cells into
the table, tests, fronts and advice, ``report`` writes the table and the HTML page.
"""
