"""`takd`: the product's command line, above the flows. It runs every stage (tasks/cli.py), the
whole pipeline as a Prefect flow, and the experiments (experiments/cli.py) as flows too."""
