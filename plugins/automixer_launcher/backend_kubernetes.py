"""`kubernetes` backend: the command in a pod, through the cncf.kubernetes provider.

`pod_operator()` builds a KubernetesPodOperator for one argv from the backend settings:
image, GPU or CPU resources (GPU steps ask for `nvidia.com/gpu`), node selector and
tolerations per kind of step, the shared runs volume, env. AutomixerStepOperator runs it
inside its own execute() and forwards the deferral re-entry (`trigger_reentry`) and
on_kill to it, so that the pod is waited on by the triggerer, not by a worker slot.

The provider is imported here only, when a kubernetes task runs (DAG parsing stays fast).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence


def pod_operator(argv: Sequence[str], *, task_id: str, gpu: bool, settings: Mapping[str, Any]):
    """A KubernetesPodOperator (not attached to a DAG) that runs argv and nothing else."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    kind = settings["gpu" if gpu else "cpu"]
    volumes, mounts, tolerations, pull_secrets = _k8s_objects(settings, kind)
    resources = kind.get("resources") or {}
    return KubernetesPodOperator(
        task_id=task_id,
        name=_pod_name(argv),
        namespace=settings.get("namespace"),
        image=settings["image"],
        image_pull_policy=settings.get("image_pull_policy"),
        image_pull_secrets=pull_secrets,
        # The CLI itself, no shell: what runs is exactly the argv the other backends run.
        cmds=[settings.get("automixer") or "automixer"],
        arguments=list(argv[1:]),
        env_vars={k: str(v) for k, v in (settings.get("env") or {}).items()},
        labels={**(settings.get("labels") or {}), "automixer-step": argv[1]},
        annotations=settings.get("annotations") or None,
        container_resources=k8s.V1ResourceRequirements(
            requests=_quantities(resources.get("requests")), limits=_quantities(resources.get("limits"))),
        node_selector=dict(kind.get("node_selector") or {}) or None,
        tolerations=tolerations,
        volumes=volumes,
        volume_mounts=mounts,
        service_account_name=settings.get("service_account_name"),
        kubernetes_conn_id=settings.get("kubernetes_conn_id"),
        in_cluster=settings.get("in_cluster"),
        config_file=settings.get("config_file"),
        cluster_context=settings.get("cluster_context"),
        deferrable=bool(settings.get("deferrable", True)),
        poll_interval=float(settings.get("poll_interval", 10)),
        startup_timeout_seconds=int(settings.get("startup_timeout_seconds", 1800)),
        on_finish_action=settings.get("on_finish_action", "delete_succeeded_pod"),
        get_logs=True,
        do_xcom_push=False,
    )


def _k8s_objects(settings: Mapping[str, Any], kind: Mapping[str, Any]):
    """Volumes, mounts, tolerations and pull secrets from manifest-style (camelCase) dicts."""
    from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator

    pod = PodGenerator.deserialize_model_dict({"spec": {
        "volumes": settings.get("volumes") or [],
        "tolerations": kind.get("tolerations") or [],
        "imagePullSecrets": [{"name": n} for n in settings.get("image_pull_secrets") or []],
        "containers": [{"name": "base", "volumeMounts": settings.get("volume_mounts") or []}],
    }})
    spec = pod.spec
    return (spec.volumes or [], spec.containers[0].volume_mounts or [], spec.tolerations or None,
            spec.image_pull_secrets or None)


def _quantities(values: Mapping[str, Any] | None) -> dict[str, str] | None:
    return {k: str(v) for k, v in values.items()} if values else None


def _pod_name(argv: Sequence[str]) -> str:
    # automixer-score-step-300: readable in `kubectl get pods`; the provider adds a unique suffix.
    parts = ["automixer", argv[1]]
    if "--step" in argv[:-1]:
        parts += ["step", argv[argv.index("--step") + 1]]
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:50].rstrip("-")
