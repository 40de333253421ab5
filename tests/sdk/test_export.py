"""``edgetune export --merged``: a state dir written as the aggregator writes it, exported,
reloaded with plain transformers and compared with the trainer running the same adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from edgetune.cli import main  # noqa: E402
from edgetune.export import RECORD_FILE, weight_deltas  # noqa: E402
from edgetune.models import ByteTokenizer, load_model  # noqa: E402
from edgetune.trainers.torch_lora import TorchLoraTrainer  # noqa: E402
from edgetune.wire import GlobalAdapter  # noqa: E402
from edgetune_aggregator.store import FleetState, StateStore  # noqa: E402

from helpers.commands import TORCH_FREE  # noqa: E402
from helpers.lora import blocks, merged_for, spec_for  # noqa: E402

# seeded: the export loads the base again, so the test's base must be the same weights
REFS = ["tiny-llama:seed=3", "tiny-gpt2:seed=3"]


def global_adapter(ref: str, version: int = 1) -> GlobalAdapter:
    """Random nonzero factors on the LoRA targets and a frozen delta on a target and a layer
    without LoRA, so every term of the merge shows in the logits."""
    loaded = load_model(ref)
    spec = spec_for(ref)
    trainer = TorchLoraTrainer(loaded, spec)
    rng = np.random.default_rng(version)
    tensors = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in trainer.get_adapter().items()}
    return GlobalAdapter(version=version, round=version, model_fingerprint=loaded.manifest.fingerprint,
                         adapter=spec, tensors=tensors, merged=merged_for(ref, seed=version, scale=0.1))


def write_state(directory, ref: str, adapters: list[GlobalAdapter]) -> None:
    """As the daemon leaves it: every version kept, state.json naming the last."""
    store = StateStore(directory)
    for adapter in adapters:
        store.save_global(adapter)
    store.save_state(FleetState("plant-7", load_model(ref).manifest, adapters[0].adapter,
                                round=adapters[-1].round, global_version=adapters[-1].version))


def trainer_logits(ref: str, adapter: GlobalAdapter, ids: torch.Tensor) -> torch.Tensor:
    trainer = TorchLoraTrainer(load_model(ref), adapter.adapter)
    trainer.set_adapter(adapter.tensors)
    trainer.set_merged(adapter.merged)
    with torch.no_grad():
        return trainer.model(input_ids=ids).logits


def test_seeded_tiny_models_reload_identically():
    for ref in REFS:
        a, b = (load_model(ref).model.state_dict() for _ in range(2))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ref", REFS)
def test_export_loads_with_transformers_and_matches_the_trainer(ref, tmp_path):
    from transformers import AutoModelForCausalLM

    adapters = [global_adapter(ref, 1), global_adapter(ref, 2)]
    write_state(tmp_path / "state", ref, adapters)
    out = tmp_path / "export"
    assert main(["export", "--merged", "--state-dir", str(tmp_path / "state"), "--model", ref, "--out", str(out)]) == 0

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer_config.json").exists()  # ByteTokenizer
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())  # readable by whoever deploys it
    ids = torch.from_numpy(blocks()[:2])
    with torch.no_grad():
        actual = exported(input_ids=ids).logits
        base = load_model(ref).model(input_ids=ids).logits
    expected = trainer_logits(ref, adapters[-1], ids)  # the current version by default
    assert not torch.allclose(expected, base, atol=1e-2)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)

    record = json.loads((out / RECORD_FILE).read_text())
    frozen = sorted({n.rsplit(".", 1)[0] for n, t in adapters[-1].merged.items() if t.size})
    targets = sorted({n.rsplit(".", 1)[0] for n in adapters[-1].tensors})
    assert record["version"] == 2 and record["model_fingerprint"] == adapters[-1].model_fingerprint
    assert record["merged_modules"] == sorted(set(frozen) | set(targets))
    assert record["adapter"]["rank"] == 4 and record["tokenizer_saved"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "state"]  # no temporary folders left

    older = tmp_path / "v1"
    assert main(["export", "--merged", "--state-dir", str(tmp_path / "state"), "--version", "1",
                 "--model", ref, "--out", str(older)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(older)(input_ids=ids).logits,
                                   trainer_logits(ref, adapters[0], ids), atol=1e-4, rtol=0)


def test_weight_deltas_are_the_documented_sum():
    ref = REFS[0]
    adapter = global_adapter(ref)
    modules = load_model(ref).manifest.modules
    deltas = weight_deltas(adapter, modules)
    q = "model.layers.0.self_attn.q_proj"  # frozen delta and LoRA
    t, m = adapter.tensors, adapter.merged
    expected = m[f"{q}.merged_B"] @ m[f"{q}.merged_A"] + 2.0 * t[f"{q}.lora_B"] @ t[f"{q}.lora_A"]  # alpha/rank = 8/4
    np.testing.assert_allclose(deltas[q], expected, rtol=1e-5, atol=1e-6)
    assert "model.layers.1.self_attn.o_proj" not in deltas  # k = 0
    assert deltas["model.layers.1.mlp.down_proj"].shape == modules["model.layers.1.mlp.down_proj"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    return err[-1]


def test_wrong_base_model_is_refused(tmp_path, capsys):
    write_state(tmp_path / "state", REFS[0], [global_adapter(REFS[0])])
    out = tmp_path / "export"
    code = main(["export", "--merged", "--state-dir", str(tmp_path / "state"), "--model", "tiny-gpt2", "--out", str(out)])
    assert code == 2
    message = one_line_error(capsys)
    assert message.startswith("edgetune: error:") and "fingerprint" in message and "--model" in message
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["state"]


def test_existing_output_is_refused_unless_forced(tmp_path, capsys):
    write_state(tmp_path / "state", REFS[0], [global_adapter(REFS[0])])
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["export", "--merged", "--state-dir", str(tmp_path / "state"), "--model", REFS[0], "--out", str(out)]
    assert main(args) == 2
    assert "--force" in one_line_error(capsys) and (out / "keep.txt").read_text() == "mine"
    assert main(args + ["--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "state"]  # no temporary folders left


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--merged", "--version", "7"], "v000007.msgpack does not exist; versions in"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, extra, message):
    write_state(tmp_path / "state", REFS[0], [global_adapter(REFS[0])])
    code = main(["export", *extra, "--state-dir", str(tmp_path / "state"), "--model", REFS[0],
                 "--out", str(tmp_path / "export")])
    assert code == 2 and message in one_line_error(capsys)


def test_the_export_form_is_required(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--state-dir", str(tmp_path), "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "one of the arguments --merged --onnx is required" in capsys.readouterr().err


def test_state_dir_without_state_is_refused(tmp_path, capsys):
    assert main(["export", "--merged", "--state-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no state.json" in one_line_error(capsys)


def test_the_cli_and_export_module_import_without_torch():
    import subprocess
    import sys

    code = "import sys, edgetune.cli, edgetune.export; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})


@pytest.mark.parametrize("ref", REFS)
def test_the_aggregators_peft_adapter_carries_the_frozen_delta(ref, tmp_path):
    """state_dir/adapter folds ``merged`` into per-module-rank LoRA factors (rank_pattern), so
    PEFT alone reproduces the global model, layers without trainable factors included."""
    import peft

    adapter = global_adapter(ref)
    write_state(tmp_path, ref, [adapter])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    ids = torch.as_tensor(blocks(16)[:2])
    model = peft.PeftModel.from_pretrained(load_model(ref).model, tmp_path / "adapter")
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = trainer_logits(ref, adapter, ids)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("ref", REFS)
def test_onnx_export_generates_with_onnxruntime_like_the_trainer(ref, tmp_path):
    """``export --onnx``: the logits of the ONNX graph (onnxruntime) equal the trainer's with
    the same adapter, and greedy generation with the KV cache picks the same tokens as greedy
    decoding of the trainer's model, token by token without a cache."""
    pytest.importorskip("optimum.exporters.onnx")
    from edgetune.ort.generate import OnnxGenerator

    adapter = global_adapter(ref, 1)
    write_state(tmp_path / "state", ref, [adapter])
    out = tmp_path / "onnx"
    assert main(["export", "--onnx", "--state-dir", str(tmp_path / "state"), "--model", ref, "--out", str(out)]) == 0
    assert json.loads((out / RECORD_FILE).read_text())["format"] == "onnx"
    import onnx

    assert onnx.load(str(out / "model.onnx"), load_external_data=False).ir_version <= 10
    generator = OnnxGenerator(out, threads=1)
    ids = blocks()[0, :20].tolist()
    expected = trainer_logits(ref, adapter, torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(generator.logits(ids), expected, atol=1e-4, rtol=0)

    result = generator.generate("the pump on line 3 ", max_new_tokens=12, stop_at_eos=False)
    trainer = TorchLoraTrainer(load_model(ref), adapter.adapter)
    trainer.set_adapter(adapter.tensors)
    trainer.set_merged(adapter.merged)
    context = ByteTokenizer().encode("the pump on line 3 ")
    greedy = []
    with torch.no_grad():
        for _ in range(12):
            token = int(trainer.model(input_ids=torch.tensor([context + greedy])).logits[0, -1].argmax())
            greedy.append(token)
    assert result.ids == greedy and result.prompt_tokens == len(context)
    sampled = [generator.generate("the pump", 8, temperature=1.0, top_k=5, seed=s, stop_at_eos=False).ids for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_generate_runs_without_torch(tmp_path):
    """``edgetune generate`` on an ONNX export, with torch and transformers uninstallable."""
    pytest.importorskip("optimum.exporters.onnx")
    import subprocess
    import sys

    ref = REFS[0]
    write_state(tmp_path / "state", ref, [global_adapter(ref, 1)])
    out = tmp_path / "onnx"
    assert main(["export", "--onnx", "--state-dir", str(tmp_path / "state"), "--model", ref, "--out", str(out)]) == 0
    done = subprocess.run([sys.executable, str(TORCH_FREE), "generate", "--onnx", str(out),
                           "--prompt", "replace bearing", "--max-new-tokens", "6", "--threads", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    text, forbidden = done.stdout.rsplit("LOADED-FORBIDDEN:", 1)
    assert forbidden.strip() == "" and text.strip()
