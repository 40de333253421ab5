"""The ONNX Runtime backend against the PyTorch one, on tiny models built in code: artifacts
from ``build_artifacts``, training parity step by step, lower ranks and frozen merged deltas,
and refusal of damaged or mismatched artifacts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime.training")

from edgetune.adapters.lora import init_lora, lora_shapes  # noqa: E402
from edgetune.models import load_model  # noqa: E402
from edgetune.ort.artifacts import MANIFEST_FILE, ArtifactError, load_manifest  # noqa: E402
from edgetune.ort.build import build_artifacts  # noqa: E402
from edgetune.trainers.ort_lora import OrtLoraTrainer, load_artifacts  # noqa: E402
from edgetune.trainers.torch_lora import TorchLoraTrainer  # noqa: E402
from edgetune.wire import LoraSpec, TrainSettings  # noqa: E402

LLAMA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
GPT2 = LoraSpec(rank=4, alpha=8.0, target_modules=("c_attn",))


@pytest.fixture(scope="module")
def llama_artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / "tiny-llama"
    build_artifacts("tiny-llama", out, rank=LLAMA.rank, alpha=LLAMA.alpha, targets=LLAMA.target_modules)
    return out


@pytest.fixture(scope="module")
def gpt2_artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / "tiny-gpt2"
    build_artifacts("tiny-gpt2", out, rank=GPT2.rank, alpha=GPT2.alpha, targets=GPT2.target_modules)
    return out


def start_adapter(spec: LoraSpec, ref: str, seed: int = 1) -> dict[str, np.ndarray]:
    """A LoRA start with B ≠ 0, so every factor gets a gradient from the first step."""
    loaded = load_model(ref)
    tensors = init_lora(spec, loaded.manifest.modules, seed)
    rng = np.random.default_rng(seed)
    for name in tensors:
        if name.endswith(".lora_B"):
            tensors[name] = rng.normal(0, 0.02, tensors[name].shape).astype(np.float32)
    return tensors


def token_batches(count: int, batch: int = 2, length: int = 24, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (batch, length)) for _ in range(count)]


def train_both(folder, ref: str, spec: LoraSpec, settings: TrainSettings, start, merged=None):
    """Train the same start on the same batches with both backends; per-step losses and the
    final factors of each."""
    batches = token_batches(settings.local_steps * settings.grad_accum, settings.batch_size, settings.seq_len)
    results = {}
    for name, trainer in (("torch", TorchLoraTrainer(load_model(ref), spec)), ("ort", OrtLoraTrainer(folder, spec))):
        trainer.set_adapter(start)
        if merged:
            trainer.set_merged(merged)
        losses: list[float] = []
        trainer.train(iter(batches), settings, on_step=lambda step, total, loss: losses.append(loss))
        results[name] = (np.array(losses), trainer.get_adapter(), trainer)
    return results


def assert_parity(results, start, rtol: float = 1e-3) -> None:
    torch_losses, torch_factors, _ = results["torch"]
    ort_losses, ort_factors, _ = results["ort"]
    assert len(torch_losses) == len(ort_losses)
    np.testing.assert_allclose(ort_losses, torch_losses, rtol=rtol)  # at every step
    for name in start:
        torch_delta = torch_factors[name] - start[name]
        ort_delta = ort_factors[name] - start[name]
        assert np.abs(torch_delta).max() > 0, f"{name} did not train"
        assert np.abs(ort_delta - torch_delta).max() <= rtol * np.abs(torch_delta).max(), name


@pytest.mark.parametrize("grad_accum, proximal_mu, weight_decay", [(1, 0.0, 0.01), (2, 0.5, 0.0)])
def test_twenty_steps_match_pytorch(llama_artifacts, grad_accum, proximal_mu, weight_decay):
    settings = TrainSettings(local_steps=20, batch_size=2, grad_accum=grad_accum, seq_len=24, learning_rate=1e-3,
                             weight_decay=weight_decay, proximal_mu=proximal_mu)
    start = start_adapter(LLAMA, "tiny-llama")
    assert_parity(train_both(llama_artifacts, "tiny-llama", LLAMA, settings, start), start)


def test_lower_rank_merged_delta_and_a_second_round_match_pytorch(llama_artifacts):
    """Rank 2 on rank-4 artifacts (zero padding), a merged delta on a target and on a layer
    without LoRA, then a second ``train`` call (which needs fresh optimizer moments)."""
    spec = LoraSpec(rank=2, alpha=4.0, target_modules=LLAMA.target_modules)  # same scale, alpha / rank = 2
    start = start_adapter(spec, "tiny-llama")
    rng = np.random.default_rng(5)
    merged = {
        "model.layers.0.self_attn.q_proj.merged_A": rng.normal(0, 0.1, (3, 64)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.merged_B": rng.normal(0, 0.1, (64, 3)).astype(np.float32),
        "model.layers.1.mlp.down_proj.merged_A": rng.normal(0, 0.1, (2, 128)).astype(np.float32),
        "model.layers.1.mlp.down_proj.merged_B": rng.normal(0, 0.1, (64, 2)).astype(np.float32),
    }
    settings = TrainSettings(local_steps=5, batch_size=2, seq_len=16, learning_rate=1e-2)
    results = train_both(llama_artifacts, "tiny-llama", spec, settings, start, merged)
    assert_parity(results, start)
    held = np.concatenate(token_batches(3, length=16, seed=9))
    second = token_batches(5, length=16, seed=3)
    for name in ("torch", "ort"):
        trainer = results[name][2]
        trainer.train(iter(second), settings)
        ppl_with = trainer.perplexity(held)
        trainer.set_merged({})
        results[name] = (*results[name][:2], trainer, trainer.get_adapter(), ppl_with, trainer.perplexity(held))
    for name in start:
        np.testing.assert_allclose(results["ort"][3][name], results["torch"][3][name], rtol=1e-3, atol=1e-6)
    assert results["ort"][3]["model.layers.0.self_attn.q_proj.lora_A"].shape == (2, 64)
    np.testing.assert_allclose(results["ort"][4], results["torch"][4], rtol=1e-4)
    np.testing.assert_allclose(results["ort"][5], results["torch"][5], rtol=1e-4)
    assert abs(results["ort"][4] - results["ort"][5]) > 1e-3  # the delta mattered


def test_gpt2_conv1d_layers_train_like_pytorch(gpt2_artifacts):
    """GPT-2 stores its weights (in, out): the merged delta goes in transposed."""
    start = start_adapter(GPT2, "tiny-gpt2")
    rng = np.random.default_rng(2)
    merged = {"transformer.h.0.mlp.c_fc.merged_A": rng.normal(0, 0.1, (2, 64)).astype(np.float32),
              "transformer.h.0.mlp.c_fc.merged_B": rng.normal(0, 0.1, (256, 2)).astype(np.float32)}
    settings = TrainSettings(local_steps=8, batch_size=2, seq_len=20, learning_rate=1e-3)
    assert_parity(train_both(gpt2_artifacts, "tiny-gpt2", GPT2, settings, start, merged), start)


def test_dynamic_batch_and_sequence_and_perplexity(llama_artifacts):
    start = start_adapter(LLAMA, "tiny-llama")
    torch_trainer = TorchLoraTrainer(load_model("tiny-llama"), LLAMA)
    ort_trainer = OrtLoraTrainer(llama_artifacts, LLAMA)
    for trainer in (torch_trainer, ort_trainer):
        trainer.set_adapter(start)
    for batch, length in ((1, 5), (3, 40), (7, 64)):
        blocks = np.random.default_rng(batch).integers(0, 256, (batch, length))
        np.testing.assert_allclose(ort_trainer.perplexity(blocks, batch_size=4),
                                   torch_trainer.perplexity(blocks, batch_size=4), rtol=1e-5)


def test_the_manifest_describes_the_artifacts(llama_artifacts):
    manifest = load_manifest(llama_artifacts)
    loaded = load_model("tiny-llama")
    assert manifest.model.fingerprint == loaded.manifest.fingerprint
    assert {p.name: p.shape for p in manifest.parameters} == lora_shapes(LLAMA, loaded.manifest.modules)
    assert manifest.trainable_size == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4)) == 1792  # q (64, 64), v (32, 64)
    assert manifest.versions["opset"] == "15" and "onnxruntime-training" in manifest.versions
    assert set(manifest.base_weights) == set(loaded.manifest.modules)
    import onnx

    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        assert onnx.load(str(llama_artifacts / name), load_external_data=False).ir_version <= 10


@pytest.fixture
def copy_of(llama_artifacts, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(llama_artifacts, folder)
    return folder


def test_modified_files_are_refused(copy_of):
    data = bytearray((copy_of / "checkpoint").read_bytes())
    data[-10] ^= 0xFF
    (copy_of / "checkpoint").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checkpoint does not match its manifest"):
        OrtLoraTrainer(copy_of, LLAMA)


def test_a_wrong_model_hash_is_refused(copy_of, llama_artifacts):
    manifest = json.loads((copy_of / MANIFEST_FILE).read_text())
    real = manifest["model_hash"]
    with pytest.raises(ArtifactError, match="built for base weights"):
        load_artifacts(copy_of, expect_model_hash="00" + real[2:16])
    assert load_artifacts(copy_of, expect_model_hash=real[:12]).model_hash == real
    # a manifest that names other base weights than the checkpoint holds
    manifest["model_hash"] = "f" * 64
    (copy_of / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="other base weights"):
        OrtLoraTrainer(copy_of, LLAMA)


@pytest.mark.parametrize("spec, message", [
    (LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "k_proj")), r"not built: \[.model.layers.0.self_attn.k_proj"),
    (LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj")), "rank 8 but the artifacts were built for rank 4"),
    (LoraSpec(rank=4, alpha=16.0, target_modules=("q_proj", "v_proj")), "alpha/rank = 4 but the artifacts by 2"),
    (LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), dropout=0.1), "without dropout"),
])
def test_a_mismatched_adapter_layout_is_refused(llama_artifacts, spec, message):
    with pytest.raises(ArtifactError, match=message):
        OrtLoraTrainer(llama_artifacts, spec)


def test_missing_or_foreign_folders_say_what_to_do(tmp_path, copy_of):
    with pytest.raises(ArtifactError, match="edgetune build-ort"):
        load_manifest(tmp_path)
    (copy_of / "eval_model.onnx").unlink()
    with pytest.raises(ArtifactError, match="eval_model.onnx is missing"):
        load_manifest(copy_of)
    (copy_of / MANIFEST_FILE).write_text(json.dumps({"kind": "edgetune-ort-artifacts", "format": 99}))
    with pytest.raises(ArtifactError, match="format 99"):
        load_manifest(copy_of)


def test_the_backend_choice(monkeypatch, tmp_path):
    from edgetune import workload

    assert workload.choose_backend("auto", tmp_path) == "torch"  # torch is here: it can do more
    assert workload.choose_backend("ort", tmp_path) == "ort"
    with pytest.raises(ValueError, match="needs --artifacts"):
        workload.choose_backend("ort", None)
    monkeypatch.setattr(workload, "_installed", lambda module: module not in ("torch", "transformers"))
    assert workload.choose_backend("auto", tmp_path) == "ort"
    with pytest.raises(ValueError, match="no --artifacts"):
        workload.choose_backend("auto", None)
    with pytest.raises(ValueError, match="pip install 'edgetune\\[torch\\]'"):
        workload.choose_backend("torch", None)


def test_torch_free_devices_are_planned_within_what_onnx_runtime_can_do():
    from edgetune.planning.planner import PlanOptions, for_capabilities
    from edgetune.wire import Capabilities

    options = PlanOptions(deadline_s=60, ranks=(2, 4, 8, 16))
    assert for_capabilities(options, Capabilities()) is options
    narrowed = for_capabilities(options, Capabilities(backends=("ort",), max_rank=8))
    assert narrowed.ranks == (2, 4, 8) and narrowed.quantizations == ("float32",)
    assert narrowed.checkpointing == (False,) and narrowed.utility_rank == 16


def test_an_ort_workload_refuses_what_it_cannot_do(llama_artifacts):
    from edgetune.workload import Workload

    work = Workload.load(["a line of text %d" % i for i in range(20)], trainer="ort", artifacts=llama_artifacts)
    assert work.backend == "ort" and work.max_rank == 4
    assert work.manifest.fingerprint == load_model("tiny-llama").manifest.fingerprint
    with pytest.raises(ValueError, match="float32 base only"):
        work.trainer(LLAMA, quantization="nf4")
    with pytest.raises(ValueError, match="needs the torch backend"):
        work.importance(["model.layers.0.self_attn.q_proj"], TrainSettings(), None)
    first = work.trainer(LLAMA)
    assert work.trainer(LLAMA) is first


def test_no_extra_can_pull_onnxruntime_next_to_onnxruntime_training():
    """Both distributions install the ``onnxruntime`` module: the extras must never ask for
    ``onnxruntime`` (or optimum-onnx's ``[onnxruntime]`` extra), and this environment has one."""
    import re
    import tomllib
    from importlib import metadata
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}
    assert "onnxruntime-training" in names and "onnxruntime" not in names and "onnxruntime-gpu" not in names
    assert not [r for r in requirements if r.lower().startswith("optimum-onnx[")]
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution("onnxruntime")


def test_both_onnxruntime_distributions_are_refused_with_what_to_do(monkeypatch):
    from importlib import metadata

    from edgetune.ort import runtime

    monkeypatch.setattr(metadata, "distribution", lambda name: object())
    with pytest.raises(ImportError, match="both onnxruntime and onnxruntime-training are installed"):
        runtime._refuse_both_distributions()


def test_numpy_adamw_and_clipping_follow_pytorch():
    import torch

    from edgetune.trainers.adamw import AdamW, clip_by_global_norm

    rng = np.random.default_rng(0)
    start = rng.normal(size=300).astype(np.float32)
    grads = [rng.normal(scale=s, size=300).astype(np.float32) for s in (3.0, 0.01, 1.0, 5.0, 1e-4)]
    reference = torch.nn.Parameter(torch.tensor(start))
    torch_optimizer = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.1)
    mine, optimizer = start.copy(), AdamW(300, 1e-2, weight_decay=0.1)
    for grad in grads:
        reference.grad = torch.tensor(grad)
        torch_norm = float(torch.nn.utils.clip_grad_norm_([reference], 1.0))
        torch_optimizer.step()
        clipped = grad.copy()
        assert clip_by_global_norm(clipped, 1.0) == pytest.approx(torch_norm, rel=1e-5)
        optimizer.step(mine, clipped)
        np.testing.assert_allclose(mine, reference.detach().numpy(), rtol=1e-5, atol=1e-7)
    zero = np.zeros(4, np.float32)  # zero-padded components stay exactly zero
    padded = AdamW(4, 1e-2, weight_decay=0.1)
    for _ in range(3):
        padded.step(zero, np.zeros(4, np.float32))
    assert not zero.any()


def test_twelve_layers_keep_names_and_training_apart(tmp_path):
    """With layers 0..11, the checkpoint lists parameters in name order (layers.10 before
    layers.2) while the contiguous buffer follows the graph (layers.2 first): the manifest
    records the buffer's order, and factors round-trip and train under the right names."""
    ref = "tiny-llama:layers=12"
    build_artifacts(ref, tmp_path / "deep", rank=4, alpha=8.0)
    names = [p.name for p in load_manifest(tmp_path / "deep").parameters]
    assert names.index("model.layers.2.self_attn.q_proj.lora_A") < names.index("model.layers.10.self_attn.q_proj.lora_A")
    start = start_adapter(LLAMA, ref)
    trainer = OrtLoraTrainer(tmp_path / "deep", LLAMA)
    trainer.set_adapter(start)
    assert all(np.array_equal(trainer.get_adapter()[k], start[k]) for k in start)
    settings = TrainSettings(local_steps=4, batch_size=2, seq_len=16, learning_rate=1e-3)
    assert_parity(train_both(tmp_path / "deep", ref, LLAMA, settings, start), start)


def test_build_ort_command_line(tmp_path, capsys):
    from edgetune.cli import main

    out = tmp_path / "artifacts"
    assert main(["build-ort", "--model", "tiny-gpt2", "--rank", "2", "--out", str(out)]) == 0
    manifest = load_manifest(out)
    assert manifest.adapter.rank == 2 and manifest.adapter.alpha == 16.0 and manifest.adapter.target_modules == ("c_attn",)
    assert manifest.model_hash[:16] in capsys.readouterr().out
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert main(["build-ort", "--model", "tiny-gpt2", "--rank", "2", "--out", str(out)]) == 2
    assert "not empty: pass --force" in capsys.readouterr().err
    assert main(["build-ort", "--model", "tiny-gpt2", "--targets", "q_proj", "--out", str(tmp_path / "x")]) == 2
    assert "match no linear layer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_an_ort_device_plans_within_its_artifacts_and_backs_off_without_torch_rungs(llama_artifacts):
    from edgetune.backoff import is_out_of_memory, next_fallback
    from edgetune.device import Device, DeviceConfig
    from edgetune.transport import open_transport
    from edgetune.wire import DevicePlan, RoundTask, TaskKind
    from edgetune.workload import Workload

    work = Workload.load(["a line of text %d" % i for i in range(20)], trainer="ort", artifacts=llama_artifacts)
    device = Device(DeviceConfig("plan-test", "gw-1"), open_transport("memory://plan-test", client_id="gw-1"), work)
    task = RoundTask(1, TaskKind.TRAIN, 0, work.manifest.fingerprint, adapter=LoraSpec(rank=16, alpha=64.0))
    assert device.worker.plan(task).rank == 4  # the fleet trains rank 16; these artifacts hold rank 4

    class Fail(Exception):  # ONNX Runtime's errors derive from Exception, in its own module
        __module__ = "onnxruntime.capi.onnxruntime_pybind11_state"

    assert is_out_of_memory(Fail("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"))
    assert not is_out_of_memory(Fail("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad input"))
    plan = DevicePlan(4, "float32", 1, 10)
    assert next_fallback(plan, 1, (), checkpointing=False)[2] == "rank 4 → 2"
    assert next_fallback(DevicePlan(1, "float32", 1, 10), 1, (), checkpointing=False) is None


@pytest.mark.slow
def test_the_smollm2_tokenizer_saved_for_torch_free_devices_gives_the_same_ids(tmp_path):
    """The torch-free device tokenizes with ``tokenizers`` from the saved ``tokenizer.json``;
    its ids must equal the Hugging Face tokenizer's that a torch device uses (special tokens,
    no BOS: the GGUF's settings) or the two devices would train on different tokens."""
    from edgetune.ort.build import _save_tokenizer
    from edgetune.ort.model import FileTokenizer

    loaded = load_model(None)
    assert _save_tokenizer(loaded.tokenizer, tmp_path) == "tokenizers"
    saved = FileTokenizer(tmp_path / "tokenizer.json", loaded.tokenizer.eos_token_id)
    texts = ["The pump on line 3 vibrates at 12.5 mm/s; replace bearing B-7.", "  leading spaces\tand tabs\n",
             "Ünïcödé — 東京 🚀", "<|im_start|>user\nhello<|im_end|>", ""]
    for text in texts:
        assert saved.encode(text) == loaded.tokenizer.encode(text), text
        assert saved.decode(saved.encode(text)) == loaded.tokenizer.decode(loaded.tokenizer.encode(text),
                                                                            skip_special_tokens=True)


def test_the_cost_model_predicts_ort_devices_with_onnx_runtime_coefficients():
    """The calibration holds coefficients measured on the ONNX Runtime trainer
    (``benchmarks/calibrate_costmodel.py --backend ort``); a torch-free device is planned
    with them, a torch device as before."""
    from edgetune.planning.costmodel import Arch, Calibration, Config, estimate_memory, estimate_step_seconds
    from edgetune.wire import DeviceProfile, ModelManifest

    calibration = Calibration.load()
    assert "ort" in calibration.backends and calibration.for_backend("torch") is calibration
    ort = calibration.for_backend("ort")
    assert ort.seconds_per_gflop["float32"] != calibration.seconds_per_gflop["float32"]
    modules = {f"model.layers.{i}.self_attn.{m}": (576, 576) for i in range(30) for m in ("q_proj", "v_proj")}
    arch = Arch.from_manifest(ModelManifest("smol", "f", modules, 49152, 576, 30, 9, 134_515_008))
    profile = DeviceProfile("x", 8 << 30, {"float32": 100.0})
    torch_config = Config(8, "float32", 4, 128)
    ort_config = Config(8, "float32", 4, 128, backend="ort")
    assert estimate_memory(arch, ort_config, calibration).total == estimate_memory(arch, torch_config, ort).total
    assert estimate_step_seconds(arch, ort_config, profile, calibration) == \
        estimate_step_seconds(arch, torch_config, profile, ort)
    assert estimate_step_seconds(arch, ort_config, profile, calibration) != \
        estimate_step_seconds(arch, torch_config, profile, calibration)
    # a backend never measured falls back to the default coefficients rather than failing
    assert calibration.for_backend("tflite") is calibration


def test_personalizing_above_the_artifacts_rank_keeps_the_rest_frozen(llama_artifacts):
    """A torch-free device personalizes a rank-8 global adapter on rank-4 artifacts: it trains
    the leading 4 components and keeps the other 4 frozen, so α = 0 is exactly the global model
    (as the torch trainer computes it at rank 8)."""
    from edgetune.personalize import PersonalizeSettings, personalize
    from edgetune.wire import GlobalAdapter
    from edgetune.workload import OrtWorkload

    texts = [f"record {i}: the pump on line {i % 3} was serviced and its seal replaced" for i in range(40)]
    workload = OrtWorkload.load(texts, trainer="ort", artifacts=llama_artifacts, heldout_fraction=0.2)
    wide = LoraSpec(rank=8, alpha=16.0, target_modules=LLAMA.target_modules)  # same scale as the artifacts
    adapter = GlobalAdapter(2, 2, workload.manifest.fingerprint, wide, start_adapter(wide, "tiny-llama"))
    settings = PersonalizeSettings(learning_rate=1e-2, steps=3, batch_size=2, seq_len=16, alpha=0.0)
    personal, report = personalize(workload, adapter, settings, "ort-1")
    reference = TorchLoraTrainer(load_model("tiny-llama"), wide)
    reference.set_adapter(adapter.tensors)
    held = workload.heldout_blocks(16)[:16]
    assert report.global_ppl == pytest.approx(reference.perplexity(held), rel=1e-4)
    assert report.personal_ppl == pytest.approx(report.global_ppl, rel=1e-6)
    assert personal.spec.rank == 4 and personal.merged  # the rest rides in the frozen delta
    assert report.local_ppl != pytest.approx(report.global_ppl, rel=1e-6)  # it did train
