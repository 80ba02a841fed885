"""Every file in cluster/ parses and asks for what capsafe needs."""

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs(name: str) -> None:
    text = (CLUSTER / name).read_text()
    assert text.startswith("#") and "ray up" in text and "ray down" in text
    cfg = yaml.safe_load(text)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers)
    for t in workers:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
    assert any("capsafe" in c and "[cuda]" in c for c in cfg["setup_commands"])
    # issue 26 §6: every node mounts the shared folder the GPU specs write to (initialization_commands run on
    # the head and on every worker the autoscaler starts)
    assert any("mount" in c and " /mnt/shared" in c for c in cfg["initialization_commands"])


def test_kuberay_manifests() -> None:
    docs = {p.name: yaml.safe_load(p.read_text()) for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))}
    assert {d["kind"] for d in docs.values()} == {"RayCluster", "RayJob"}
    job = docs["rayjob.yaml"]
    assert job["spec"]["entrypoint"].startswith("capsafe run jobs/")
    assert (CLUSTER.parent / job["spec"]["entrypoint"].split()[-1]).is_file()
    assert job["spec"]["runtimeEnvYAML"]  # the worker environment, as in cluster/runtime_env.yaml
    for doc in docs.values():
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == "2.60.0"
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for g in groups:
            for c in g["template"]["spec"]["containers"]:
                assert "capsafe" in c["image"]
                # results, checkpoints and caches on storage every pod sees
                assert {"name": "shared", "mountPath": "/mnt/shared"} in c["volumeMounts"]
                assert c["resources"]["limits"] == c["resources"]["requests"]
        for w in spec["workerGroupSpecs"]:
            assert int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            assert w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
    assert "capsafe[cuda]" in (CLUSTER / "Dockerfile").read_text()


@pytest.mark.parametrize("path", sorted((CLUSTER.parent / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_specs_validate_and_say_how_to_submit(path: Path) -> None:
    from capsafe.spec import load_spec

    spec = load_spec(path)
    if path.name not in ("demo.yaml", "mitigations.yaml"):  # the GPU-cluster specs
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ray job submit ") and f"capsafe run jobs/{path.name}" in first
        assert spec.train.use_gpu and spec.eval.gpus_per_replica >= 1 and spec.eval.engine == "vllm"
        assert spec.output_dir.startswith("/mnt/shared")  # checkpoints must be visible to every node
        assert spec.train.precision == "bf16"


def test_runtime_env_carries_the_worker_environment() -> None:
    from capsafe.runtime.ray_shell import worker_env

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
    assert set(worker_env()) - {"VLLM_CPU_KVCACHE_SPACE"} <= set(env["env_vars"])


def test_the_cuda_stack_is_pinned_like_the_cpu_one() -> None:
    # issue 26 §7: an unpinned vLLM on GPU machines would run another API than the one tested here on its CPU
    # build; torch is the version vLLM 0.32.0's wheel requires
    import tomllib

    extras = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cpu, cuda = dict(p.split("==") for p in extras["cpu"]), dict(p.split("==") for p in extras["cuda"])
    assert cuda == {"torch": "2.13.0", "vllm": cpu["vllm-cpu"]} and cpu["torch"] == cuda["torch"]
