"""What a run asks a cluster for (deploy/: Dagster's K8sRunLauncher or EcsRunLauncher): a generation run the GPUs
its engine needs, every other run (ingest, mixes, evals) none. Run tags, so they hold for every way the job is
launched (UI, backfill, schedule) and each launcher reads its own: Kubernetes `dagster-k8s/config`, ECS
`ecs/container_overrides`. With generation on a vLLM fleet (the openai backend), set generation.cluster_gpus: 0."""

from __future__ import annotations

import json

from synth_cpt.core.config import GenerationConfig

K8S_CONFIG_TAG = "dagster-k8s/config"
ECS_CONTAINER_OVERRIDES_TAG = "ecs/container_overrides"


def gpus_per_run(generation: GenerationConfig) -> int:
    return generation.tensor_parallel_size if generation.cluster_gpus is None else generation.cluster_gpus


def generation_run_tags(generation: GenerationConfig) -> dict[str, str]:
    """The run tags of synthesis_job: a GPU request per launcher, and a toleration of the usual GPU node taint."""
    gpus = gpus_per_run(generation)
    if gpus == 0:
        return {}
    k8s = {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}},
        "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    }
    ecs = {"resourceRequirements": [{"type": "GPU", "value": str(gpus)}]}
    return {K8S_CONFIG_TAG: json.dumps(k8s, sort_keys=True), ECS_CONTAINER_OVERRIDES_TAG: json.dumps(ecs, sort_keys=True)}
