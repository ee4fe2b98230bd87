"""Loading: both layouts, shards, one clear error for each kind of bad input; the package set-up."""

import json
import re
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import REPO_ROOT, make_tiny_checkpoint, requires_reference
from mlx.utils import tree_flatten

from smollm3_mlx.checkpoint import ModelLoadError
from smollm3_mlx.loading import load, load_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def make_sharded(path):
    import torch
    from transformers import SmolLM3ForCausalLM

    model = SmolLM3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = path.parent / (path.name + "-sharded")
    model.save_pretrained(out, max_shard_size="100KB")
    return out


def with_weights(ckpt, dst, edit):
    """A copy of `ckpt` at `dst` whose weights dict went through `edit`."""
    dst.mkdir()
    (dst / "config.json").write_text((ckpt / "config.json").read_text())
    weights = mx.load(str(ckpt / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    return dst


def load_error(path, **kwargs) -> str:
    """The message of the ModelLoadError that loading `path` raises; it must be one line."""
    with pytest.raises(ModelLoadError) as e:
        load_model(path, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_sharded_checkpoint_loads_like_single_file(ckpt):
    out = make_sharded(ckpt)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    ids = mx.array([[1, 2, 3, 4]])
    a, b = load_model(ckpt)(ids), load_model(out)(ids)
    assert np.array_equal(np.array(a), np.array(b))


def test_folder_without_config_is_an_error(tmp_path):
    assert load_error(tmp_path) == f"{tmp_path}: no config.json (not a model folder)"


def test_foreign_model_type_is_an_error(tmp_path, ckpt):
    bad = tmp_path / "llama"
    bad.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    assert load_error(bad) == f"{bad / 'config.json'}: model_type is 'llama', expected 'smollm3'"


def test_missing_shard_is_an_error(ckpt):
    out = make_sharded(ckpt)
    victim = sorted(out.glob("model-*.safetensors"))[-1]
    victim.unlink()
    assert load_error(out) == (
        f"{out}: shard {victim.name} named in model.safetensors.index.json is missing"
    )


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
def test_truncated_safetensors_is_an_error(tmp_path, ckpt, keep):
    # Cut in the tensor data, in the last bytes, and inside the header.
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "config.json").write_text((ckpt / "config.json").read_text())
    data = (ckpt / "model.safetensors").read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    (bad / "model.safetensors").write_bytes(data[:n])
    assert load_error(bad).startswith(f"{bad / 'model.safetensors'}: truncated")


def test_tensor_of_wrong_shape_is_an_error(tmp_path, ckpt):
    key = "model.layers.1.mlp.up_proj.weight"
    bad = with_weights(ckpt, tmp_path / "shape", lambda w: w.update({key: w[key][:, :32]}))
    assert load_error(bad) == (
        f"{bad / 'model.safetensors'}: tensor {key} has shape (128, 32), expected (128, 64)"
    )


def test_config_errors_name_config_json(tmp_path, ckpt):
    for name, edit in {
        "rope": lambda c: c.update(rope_parameters={"rope_type": "llama3", "factor": 8.0}),
        "yarn": lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
        "nope": lambda c: c.update(no_rope_layers=[1, 0]),
        "quant": lambda c: c.update(quantization={"bits": 4}),
    }.items():
        bad = tmp_path / name
        bad.mkdir()
        config = json.loads((ckpt / "config.json").read_text())
        edit(config)
        (bad / "config.json").write_text(json.dumps(config))
        (bad / "model.safetensors").symlink_to(ckpt / "model.safetensors")
        assert load_error(bad).startswith(f"{bad / 'config.json'}: "), name


def test_unknown_dtype_is_an_error(ckpt):
    assert load_error(ckpt, dtype="fp8") == (
        "dtype 'fp8' is not one of auto, float32, bfloat16, float16"
    )


def test_missing_tensor_is_an_error(tmp_path, ckpt):
    bad = with_weights(
        ckpt, tmp_path / "missing", lambda w: w.pop("model.layers.2.self_attn.k_proj.weight")
    )
    with pytest.raises(ModelLoadError, match="model.layers.2.self_attn.k_proj.weight is missing"):
        load_model(bad)


def test_untied_lm_head_is_dropped_when_tied(tmp_path, ckpt):
    extra = with_weights(
        ckpt,
        tmp_path / "extra",
        lambda w: w.update({"lm_head.weight": mx.zeros_like(w["model.embed_tokens.weight"])}),
    )
    ids = mx.array([[1, 2, 3, 4]])
    # Tied models ignore a saved lm_head: the output head stays the embedding.
    assert np.array_equal(np.array(load_model(extra)(ids)), np.array(load_model(ckpt)(ids)))


def test_mlx_layout_with_per_layer_overrides(tmp_path, ckpt):
    # The layout mlx-lm writes: config.json's "quantization" holds the defaults plus one entry
    # per layer quantized differently; layers left dense simply have no scales.
    from mlx_lm.utils import load_model as mlx_lm_load_model, quantize_model

    def predicate(path, module):
        if path == "model.layers.0.mlp.down_proj":
            return False
        if path in ("model.embed_tokens", "model.layers.1.self_attn.v_proj"):
            return {"group_size": 32, "bits": 8}
        return True

    model = load_model(ckpt, dtype=None)
    config = json.loads((ckpt / "config.json").read_text())
    model, config = quantize_model(model, config, 64, 4, quant_predicate=predicate)
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    out = tmp_path / "mlx-4bit"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))

    loaded = load_model(out)
    layers = loaded.layers
    assert type(layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(loaded.model.embed_tokens, nn.QuantizedEmbedding)
    assert (loaded.model.embed_tokens.bits, loaded.model.embed_tokens.group_size) == (8, 32)
    assert (layers[1].self_attn.v_proj.bits, layers[1].self_attn.v_proj.group_size) == (8, 32)
    assert (layers[1].self_attn.q_proj.bits, layers[1].self_attn.q_proj.group_size) == (4, 64)
    ids = mx.array([[5, 17, 300, 2, 99, 41]])
    ours = np.array(loaded(ids))
    assert np.abs(ours - np.array(model(ids))).max() <= 1e-5
    theirs, _ = mlx_lm_load_model(out)
    assert np.abs(ours - np.array(theirs(ids))).max() <= 1e-4


def test_import_does_not_pull_torch_transformers_or_mlx_lm():
    code = (
        "import sys, smollm3_mlx, smollm3_mlx.loading, smollm3_mlx.generate;"
        "bad = {'torch', 'transformers', 'mlx_lm'} & set(sys.modules); print(sorted(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert out.stdout.strip() == "[]"


@requires_reference
def test_load_by_repo_id_downloads_through_the_hub_protocol(tmp_path, monkeypatch):
    from hub_server import HubServer, use_hub

    repo = make_tiny_checkpoint(tmp_path / "repo", with_tokenizer=True)
    (repo / "notes.bin").write_bytes(b"not needed")
    with HubServer({"HuggingFaceTB/SmolLM3-3B": repo}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf")
        model, tokenizer = load("HuggingFaceTB/SmolLM3-3B")
        assert "notes.bin" not in hub.fetched()
    assert model.info.path.is_relative_to(tmp_path / "hf")
    assert tokenizer.eos_token_ids == {tokenizer.token_to_id("<|im_end|>")}
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 128256)


def test_unknown_local_path_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load(str(tmp_path / "nowhere"))


@requires_reference
def test_runtime_path_does_not_pull_torch_transformers_or_mlx_lm(tmp_path):
    # Loading, generating and chatting, in a fresh interpreter.
    path = make_tiny_checkpoint(tmp_path / "m", with_tokenizer=True)
    code = f"""
import sys
from smollm3_mlx import Chat, load, stream_generate
model, tokenizer = load({str(path)!r})
list(stream_generate(model, tokenizer, "Hi", max_tokens=2))
list(Chat(model, tokenizer, max_tokens=2).send("Hi"))
import smollm3_mlx.cli.app, smollm3_mlx.cli.console, smollm3_mlx.convert
print(sorted({{"torch", "transformers", "mlx_lm"}} & set(sys.modules)))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_pyproject_declares_the_distribution_and_its_platform_dependencies():
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    assert (project["name"], project["requires-python"]) == ("smollm3-mlx", ">=3.10")
    assert project["scripts"] == {"smollm3-mlx": "smollm3_mlx.cli.app:app"}
    deps = [Requirement(r) for r in project["dependencies"]]

    def needed(platform):
        env = {"sys_platform": platform}
        return {
            (r.name, frozenset(r.extras)) for r in deps if not r.marker or r.marker.evaluate(env)
        }

    for platform, mlx in [("darwin", ("mlx", frozenset())), ("linux", ("mlx", {"cpu"}))]:
        got = needed(platform)
        assert {(n, e) for n, e in got if n == "mlx"} == {(mlx[0], frozenset(mlx[1]))}
        names = {n for n, _ in got}
        assert {"tokenizers", "jinja2", "huggingface_hub", "typer", "rich"} <= names
        assert not {"torch", "transformers", "mlx-lm"} & names
    extras = project["optional-dependencies"]
    assert [Requirement(r).name for r in extras["compare"]] == ["mlx-lm"]
    test = {Requirement(r).name: Requirement(r) for r in extras["test"]}
    assert {"pytest", "transformers", "torch"} <= test.keys()
    assert {"server", "compare"} <= test["smollm3-mlx"].extras
    assert str(test["torch"].specifier) == "==2.13.0"


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_test_one():
    readme = (REPO_ROOT / "README.md").read_text()
    first_section = readme.split("\n## ")[1]
    assert first_section.startswith("Set-up\n")
    blocks = re.findall(r"```bash\n(.*?)```", first_section, flags=re.S)
    assert re.findall(r"```bash\n(.*?)```", readme, flags=re.S)[:2] == blocks
    assert len(blocks) == 2 and all(b.count("\n") == 1 for b in blocks)
    run, test = (b.strip() for b in blocks)
    assert "pip install" in run and "smollm3-mlx " in run
    assert "pip install" in test and "pytest" in test
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci


@pytest.mark.parametrize(
    "first", ["", "import smollm3_mlx.chat, smollm3_mlx.generate, smollm3_mlx.convert"]
)
def test_public_generate_and_convert_are_the_functions(first):
    # The submodules of the same names must not shadow them, whatever was imported before.
    code = (
        f"{first}\nimport inspect\nfrom smollm3_mlx import load, generate, convert\n"
        "import smollm3_mlx\nprint(inspect.isfunction(generate), inspect.isfunction(convert),"
        " inspect.isfunction(smollm3_mlx.generate))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert out.stdout.split() == ["True", "True", "True"]


def test_a_name_that_is_neither_a_folder_nor_a_repo_id_never_reaches_the_hub(tmp_path, monkeypatch):
    from hub_server import HubServer, use_hub

    with HubServer({}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf")
        monkeypatch.chdir(tmp_path)
        for name in ("SmolLM3-3B-4bt", "a/b/c"):
            with pytest.raises(ModelLoadError) as e:
                load(name)
            assert str(e.value) == (
                f"{name}: no local folder of that name, and not a hub repo id (OWNER/NAME)"
            )
        assert hub.requests == []


def test_a_repo_id_that_fails_says_there_is_no_such_folder_and_why(tmp_path, monkeypatch):
    from hub_server import HubServer, use_hub

    monkeypatch.chdir(tmp_path)
    with HubServer({}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf")
        with pytest.raises(ModelLoadError) as e:
            load("models/smol")  # meant as a folder here, absent: the hub has no such repo
    assert str(e.value) == (
        "models/smol: no local folder of that name, and the hub download failed: "
        "RepositoryNotFoundError: 404 Client Error: Repository not found (a private or gated "
        "repo needs HF_TOKEN with access)"
    )
    use_hub(monkeypatch, None, tmp_path / "hf", offline=True)
    with pytest.raises(ModelLoadError) as e:
        load("HuggingFaceTB/SmolLM3-3B")
    assert str(e.value) == (
        "HuggingFaceTB/SmolLM3-3B: no local folder of that name, and the hub download failed: "
        "not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
    )
    use_hub(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf")  # nothing listens: unreachable
    with pytest.raises(ModelLoadError, match="the hub cannot be reached"):
        load("HuggingFaceTB/SmolLM3-3B")
