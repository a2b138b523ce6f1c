"""AutoMixer: influence-based data mixtures from the checkpoints of a proxy training run.

The pipeline as a plain Python package; every step also runs alone from the `automixer`
CLI. Nothing in here imports Airflow.
"""

__version__ = "0.1.0"
