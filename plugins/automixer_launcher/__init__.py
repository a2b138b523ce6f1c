"""The scoring launcher: run one `automixer <step>` command line on a chosen backend.

One operator (`AutomixerStepOperator`) and three backends that all run the same argv:

- `local`      a subprocess on the Airflow worker; output streamed into the task log;
- `kubernetes` a pod (cncf.kubernetes KubernetesPodOperator, deferrable) with GPU limits,
               node selector, tolerations and the shared runs volume from the settings file;
- `slurm`      an sbatch job, on this host or through SSH (apache-airflow-providers-ssh);
               polled with scontrol/sacct, its output file copied into the task log, and
               scancel'led when the task is killed.

The backend is a DAG run parameter; its settings (image, partition, volumes...) come from a
YAML file (`backends.yaml` next to this file documents every key). Every module here stays
light at import: dags/automixer.py imports this package while the DAG is parsed, so provider
classes (kubernetes, paramiko) are imported only inside the backend that needs them.
"""

from automixer_launcher.cli_argv import BACKENDS, cli_argv, config_overrides
from automixer_launcher.step_operator import AutomixerStepOperator

__all__ = ["AutomixerStepOperator", "BACKENDS", "cli_argv", "config_overrides"]
