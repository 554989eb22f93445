"""`igfiqa study`: arms × paired seeds trained, measured by the primary protocol, and compared.

spec.py (the spec file and its runs), runner.py (data, sets and matchers once; each run here or on
SLURM; status), measure.py (one run's figures), report.py (tables, Fig. 5-like plots, paired tests,
the MLflow parent run). The paired statistics are `pipeline.evaluation.paired`.
"""
