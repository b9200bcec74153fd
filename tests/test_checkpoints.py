"""On-disk formats (FORMAT sections 4, 6, 7): every format loads back to a policy that gives the outputs of the
policy that wrote it, the rename rules cover the upstream key listings, and every mismatch fails loudly.

Reference: the tiny random policy of ``vla-scripts/make_tiny_checkpoint.py`` rebuilt in memory from the same seed
(so the comparisons also check that the tool is deterministic). All parameters are random (no constant inits), so
a key that is not loaded changes the outputs. Round trips compare with ``torch.equal``: loading copies bits.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import UPSTREAM_FACTS
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig
from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
from prismatic.models.action_heads import L1RegressionActionHead
from prismatic.models.checkpoints import (
    ACTION_QUERIES_KEY,
    UPSTREAM_BASE_CHECKPOINT_NAME,
    CheckpointError,
    detect_pro_version,
    find_component_file,
    find_prismatic_checkpoint,
    load_action_head,
    load_hf_vla,
    load_prismatic_base_checkpoint,
    load_vla_release,
    prismatic_key_for_hf_key,
    read_dataset_statistics,
    rename_prismatic_key,
    save_policy_components,
    strip_module_prefix,
    write_dataset_statistics,
    write_prismatic_base_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_DIR = UPSTREAM_FACTS
SEED = 0
# FORMAT section 7: upstream LoRA's expanded "all-linear" target list (lm_head and patch_embed.proj included).
UPSTREAM_LORA_TARGETS = [
    "down_proj", "fc1", "proj", "lm_head", "fc2", "gate_proj", "o_proj", "v_proj",
    "k_proj", "kv", "fc3", "q", "qkv", "up_proj", "q_proj",
]  # fmt: skip


def _load_tool():
    """vla-scripts/ is not a package: import the tool from its file."""
    spec = importlib.util.spec_from_file_location(
        "make_tiny_checkpoint", REPO_ROOT / "vla-scripts/make_tiny_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _read_listing(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape from an upstream listing (``key<TAB>shape<TAB>dtype``; '#' lines are comments)."""
    rows = {}
    for line in (UPSTREAM_DIR / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        rows[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return rows


# --- fixtures: the reference policy, the tool's output, inputs ---
@pytest.fixture(scope="module")
def reference():
    """The tool's policy, rebuilt; norm_stats set to what dataset_statistics.json makes them at load time."""
    policy = tool.build_tiny_policy(seed=SEED)
    policy.vla.norm_stats = policy.dataset_statistics
    return policy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tool.make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"), seed=SEED)


@pytest.fixture(scope="module")
def inputs(training_batch_factory: Callable[..., dict[str, torch.Tensor]]) -> dict:
    batch = training_batch_factory([12, 9], num_images=2, seed=3)
    prompts = [row[mask][:n].tolist() for row, mask, n in zip(batch["input_ids"], batch["attention_mask"], (12, 9))]
    proprio = torch.rand((2, 8), generator=torch.Generator().manual_seed(4)) * 2 - 1
    return {**batch, "prompts": prompts, "proprio": proprio}


def _outputs(vla, head, proprio_projector, inputs) -> dict:
    """Hidden states of a training-layout forward, and predict_action's normalized and un-normalized chunks."""
    model = vla.get_base_model() if hasattr(vla, "get_base_model") else vla
    with torch.no_grad():
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            labels=inputs["labels"],
            output_hidden_states=True,
            return_logits=False,
        )
    actions, normalized = model.predict_action(
        inputs["prompts"],
        inputs["pixel_values"],
        head,
        proprio=inputs["proprio"],
        proprio_projector=proprio_projector,
    )
    return {"hidden": out.hidden_states, "normalized": normalized, "actions": actions}


def _assert_same_outputs(got: dict, want: dict, rel: float = 0.0) -> None:
    """Bitwise equal when ``rel == 0``; else |got - want| <= rel * max|want| per tensor (scale-relative)."""

    def close(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> bool:
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if rel == 0:
            return torch.equal(a, b)
        return bool((a - b).abs().max() <= rel * b.abs().max())

    assert len(got["hidden"]) == len(want["hidden"])
    for i, (a, b) in enumerate(zip(got["hidden"], want["hidden"])):
        assert close(a, b), f"hidden state {i} differs"
    assert close(got["normalized"], want["normalized"]), "normalized actions differ"
    assert close(got["actions"], want["actions"]), "un-normalized actions differ"


@pytest.fixture(scope="module")
def reference_outputs(reference, inputs) -> dict:
    return _outputs(reference.vla, reference.action_head, reference.proprio_projector, inputs)


def _fresh_model(config_dir: Path, seed: int = 123) -> OpenVLAForActionPrediction:
    torch.manual_seed(seed)  # a different init than the reference: loading must overwrite it
    return OpenVLAForActionPrediction(OpenVLAConfig.from_pretrained(config_dir)).eval()


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- rename rules against the upstream listings (full size, no weights) ---
def test_rename_rules_map_every_upstream_base_key_onto_an_hf_key_with_its_shape():
    base, hf = _read_listing("keys_prismatic_base.txt"), _read_listing("keys_vla.txt")
    renamed = {rename_prismatic_key(key.replace("/", ".", 1)): shape for key, shape in base.items()}
    assert len(base) == len(renamed) == 982  # no two upstream keys collapse onto one name
    assert set(renamed) == set(hf) - {ACTION_QUERIES_KEY}  # everything but the action queries
    assert all(renamed[k] == hf[k] for k in renamed), [k for k in renamed if renamed[k] != hf[k]][:5]


def test_inverse_rename_gives_the_upstream_base_names():
    base, hf = _read_listing("keys_prismatic_base.txt"), _read_listing("keys_vla.txt")
    written = {"/".join(prismatic_key_for_hf_key(k)) for k in hf if k != ACTION_QUERIES_KEY}
    assert written == set(base)
    with pytest.raises(CheckpointError, match="action_queries"):
        prismatic_key_for_hf_key(ACTION_QUERIES_KEY)


# --- the tool ---
def test_tool_is_deterministic_given_the_seed(reference):
    again = tool.build_tiny_policy(seed=SEED)
    other = tool.build_tiny_policy(seed=SEED + 1)
    for name in ("vla", "action_head", "proprio_projector"):
        assert _state_equal(getattr(again, name), getattr(reference, name)), name
        assert not torch.equal(
            next(iter(getattr(other, name).parameters())), next(iter(getattr(reference, name).parameters()))
        )
    assert again.dataset_statistics == reference.dataset_statistics


def test_sincos_position_tables_match_a_float64_reference_and_change_nothing_else(reference):
    """--pos_embed_init sincos: each ViT table equals an independent numpy reference (1e-6, the float32
    rounding of values in [-1, 1]); every other parameter is bit-identical to the default ("random") policy."""
    policy = tool.build_tiny_policy(seed=SEED, pos_embed_init="sincos")
    changed = []
    for (name, ours), (_, ref) in zip(policy.vla.named_parameters(), reference.vla.named_parameters()):
        if torch.equal(ours, ref):
            continue
        changed.append(name)
        _, n, dim = ours.shape
        grid, quarter = int(round(n**0.5)), dim // 4
        expected = np.empty((n, dim))
        for p in range(n):
            row, col = divmod(p, grid)  # raster order
            for half, coord in enumerate((row, col)):
                for k in range(quarter):
                    angle = coord / 10000.0 ** (k / quarter)
                    expected[p, half * 2 * quarter + k] = np.sin(angle)
                    expected[p, half * 2 * quarter + quarter + k] = np.cos(angle)
        np.testing.assert_allclose(ours[0].detach().double().numpy(), expected, atol=1e-6, rtol=0)
    assert sorted(changed) == sorted(n for n, _ in reference.vla.named_parameters() if n.endswith("pos_embed"))
    assert len(changed) == 2  # one table per ViT (DINOv2, SigLIP)
    for name in ("action_head", "proprio_projector"):
        assert _state_equal(getattr(policy, name), getattr(reference, name)), name
    with pytest.raises(ValueError, match="pos_embed_init"):
        tool.build_tiny_policy(seed=SEED, pos_embed_init="learned")


def test_width_flags_reach_the_llm_the_vits_and_the_head():
    policy = tool.build_tiny_policy(seed=SEED, llm_hidden_size=32, vit_embed_dims=(16, 24))
    vla = policy.vla
    assert vla.config.text_config.hidden_size == 32
    assert vla.config.text_config.intermediate_size == 64
    assert [vit.embed_dim for vit in vla.vision_backbone.vits] == [16, 24]
    block = policy.action_head.model.mlp_resnet_blocks[0]
    assert tuple(block.q_proj.weight.shape) == (32, 32)
    assert tuple(block.k_task.weight.shape) == (32, 32)
    assert policy.proprio_projector.fc2.out_features == 32


def test_tool_writes_every_format(tiny):
    names = {p.name for p in tiny.release_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "action_head--checkpoint.pt",
        "proprio_projector--checkpoint.pt",
    } <= names
    assert {"dataset_statistics.json", "preprocessor_config.json", "tokenizer.json", "vocab.json"} <= names
    assert (tiny.base_dir / "checkpoints" / UPSTREAM_BASE_CHECKPOINT_NAME).is_file()
    run_model = json.loads((tiny.base_dir / "config.json").read_text())["model"]
    assert set(run_model) == {
        "model_id", "arch_specifier", "vision_backbone_id", "llm_backbone_id",
        "image_resize_strategy", "llm_max_length",
    }  # fmt: skip
    assert (tiny.base_config_dir / "config.json").is_file()


# --- (a) HF files ---
def test_hf_format_round_trip(tiny, reference, reference_outputs, inputs):
    tensors = load_file(tiny.hf_dir / "model.safetensors")
    assert "language_model.lm_head.weight" not in tensors  # tied duplicate dropped, as in the released file
    assert len(tensors) == len(reference.vla.state_dict()) - 1
    vla = load_hf_vla(tiny.hf_dir)
    assert _state_equal(vla, reference.vla)
    vla.norm_stats = reference.vla.norm_stats
    _assert_same_outputs(_outputs(vla, reference.action_head, reference.proprio_projector, inputs), reference_outputs)


def test_hf_format_missing_tensor_fails_naming_it(tiny, tmp_path):
    shutil.copytree(tiny.hf_dir, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["projector.fc2.bias"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"projector\.fc2\.bias"):
        load_hf_vla(tmp_path / "hf")


# --- (c) release dir with HF files ---
def test_release_round_trip_and_dataset_statistics_replace_norm_stats(tiny, reference, reference_outputs, inputs):
    policy = load_vla_release(tiny.release_dir)
    assert policy.use_pro_version
    assert policy.num_images == 2
    stats = json.loads((tiny.release_dir / "dataset_statistics.json").read_text())
    assert policy.norm_stats == policy.vla.norm_stats == stats == reference.dataset_statistics
    assert policy.vla.config.norm_stats != stats  # config.json held other statistics; the file replaced them
    assert _state_equal(policy.action_head, reference.action_head)
    assert _state_equal(policy.proprio_projector, reference.proprio_projector)
    got = _outputs(policy.vla, policy.action_head, policy.proprio_projector, inputs)
    _assert_same_outputs(got, reference_outputs)


def test_component_files_carry_the_ddp_prefix_and_load_without_it(tiny, reference, tmp_path):
    raw = torch.load(tiny.release_dir / "action_head--checkpoint.pt", weights_only=True)
    assert all(k.startswith("module.") for k in raw)
    assert set(strip_module_prefix(raw)) == set(reference.action_head.state_dict())
    torch.save(strip_module_prefix(raw), tmp_path / "action_head--bare_checkpoint.pt")  # unprefixed also loads
    head = load_action_head(tmp_path / "action_head--bare_checkpoint.pt", reference.vla.config)
    assert _state_equal(head, reference.action_head)
    with pytest.raises(CheckpointError, match="mixes"):
        strip_module_prefix({"module.a": torch.zeros(1), "b": torch.zeros(1)})


def test_original_head_is_detected_from_its_keys(reference, tmp_path):
    config = reference.vla.config
    torch.manual_seed(5)
    head = L1RegressionActionHead(
        input_dim=config.llm_hidden_size,
        hidden_dim=config.llm_hidden_size,
        num_blocks=config.num_llm_layers,
        use_pro_version=False,
    )
    tool.randomize_parameters(head, torch.Generator().manual_seed(6))
    save_policy_components(tmp_path, "10", head, None)
    path = tmp_path / "action_head--10_checkpoint.pt"
    loaded = load_action_head(path, config)
    assert not loaded.use_pro_version
    assert _state_equal(loaded, head)
    with pytest.raises(CheckpointError, match="original"):
        load_action_head(path, config, use_pro_version=True)


def test_pro_detection_falls_back_to_the_path_only_without_block_keys():
    no_blocks = {"model.fc1.weight": torch.zeros(1)}
    assert detect_pro_version(no_blocks, "/ckpt/LIBERO-Spatial-Pro") is True
    assert detect_pro_version(no_blocks, "/ckpt/LIBERO-Spatial") is False
    pro_keys = {"model.mlp_resnet_blocks.0.k_self.weight": torch.zeros(1)}
    assert detect_pro_version(pro_keys, "/ckpt/LIBERO-Spatial") is True  # keys beat the path


def test_head_file_errors_name_the_key(reference, tmp_path):
    state = dict(reference.action_head.state_dict())
    state["model.fc2.bias"] = torch.zeros(3)
    state["model.extra.weight"] = torch.zeros(2)
    del state["model.layer_norm2.weight"]
    torch.save(state, tmp_path / "action_head--x_checkpoint.pt")
    with pytest.raises(CheckpointError) as err:
        load_action_head(tmp_path / "action_head--x_checkpoint.pt", reference.vla.config)
    for key in ("model.fc2.bias", "model.extra.weight", "model.layer_norm2.weight"):
        assert key in str(err.value)


def test_several_action_head_files_are_an_error_listing_them(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for src in tiny.release_dir.iterdir():
        (ckpt / src.name).symlink_to(src)
    (ckpt / "action_head--500_checkpoint.pt").symlink_to(tiny.release_dir / "action_head--checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"action_head--500_checkpoint\.pt.*action_head--checkpoint\.pt"):
        load_vla_release(ckpt)
    assert find_component_file(ckpt, "proprio_projector").name == "proprio_projector--checkpoint.pt"


def test_dataset_statistics_json_accepts_numpy(tmp_path):
    stats = {"d": {"action": {"q01": np.array([-1.0, 0.5]), "mask": np.array([True, False])}, "num_transitions": 3}}
    write_dataset_statistics(tmp_path, stats)
    assert read_dataset_statistics(tmp_path) == {
        "d": {"action": {"q01": [-1.0, 0.5], "mask": [True, False]}, "num_transitions": 3}
    }


# --- (b) Prismatic base run dir ---
def test_base_round_trip_with_vision(tiny, reference, reference_outputs, inputs):
    model = _fresh_model(tiny.base_config_dir)
    init_queries = model.action_queries.weight.detach().clone()
    report = load_prismatic_base_checkpoint(model, tiny.base_dir)
    assert report.source.name == UPSTREAM_BASE_CHECKPOINT_NAME
    assert report.kept_init_keys == [ACTION_QUERIES_KEY]
    assert torch.equal(model.action_queries.weight, init_queries)  # not part of the format: kept its init
    model.action_queries.load_state_dict(reference.vla.action_queries.state_dict())
    assert _state_equal(model, reference.vla)
    model.norm_stats = reference.vla.norm_stats
    got = _outputs(model, reference.action_head, reference.proprio_projector, inputs)
    _assert_same_outputs(got, reference_outputs)


def test_base_round_trip_without_vision_keeps_the_vits(tiny, reference, reference_outputs, inputs, tmp_path):
    write_prismatic_base_checkpoint(reference.vla, tmp_path / "run", include_vision=False)
    model = _fresh_model(tiny.base_config_dir)
    vision_init = {k: v.clone() for k, v in model.vision_backbone.state_dict().items()}
    report = load_prismatic_base_checkpoint(model, tmp_path / "run")
    assert any("no vision_backbone group" in n for n in report.notes)
    assert set(report.kept_init_keys) == {ACTION_QUERIES_KEY} | {f"vision_backbone.{k}" for k in vision_init}
    assert all(torch.equal(v, vision_init[k]) for k, v in model.vision_backbone.state_dict().items())
    model.vision_backbone.load_state_dict(reference.vla.vision_backbone.state_dict())
    model.action_queries.load_state_dict(reference.vla.action_queries.state_dict())
    model.norm_stats = reference.vla.norm_stats
    _assert_same_outputs(_outputs(model, reference.action_head, reference.proprio_projector, inputs), reference_outputs)


def test_base_checkpoint_file_selection(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "step-000100-epoch-00-loss=1.0000.pt").touch()
    assert find_prismatic_checkpoint(tmp_path).name == "step-000100-epoch-00-loss=1.0000.pt"
    (ckpts / "latest-checkpoint.pt").touch()
    with pytest.raises(CheckpointError, match=r"latest-checkpoint\.pt.*step-000100"):
        find_prismatic_checkpoint(tmp_path)
    assert find_prismatic_checkpoint(tmp_path, "latest-checkpoint.pt").name == "latest-checkpoint.pt"
    (ckpts / UPSTREAM_BASE_CHECKPOINT_NAME).touch()
    assert find_prismatic_checkpoint(tmp_path).name == UPSTREAM_BASE_CHECKPOINT_NAME


def _tampered_base(tiny, tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the tool's base run dir whose group state dicts went through ``edit``."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny.base_dir / "config.json", run / "config.json")
    payload = torch.load(tiny.base_dir / "checkpoints" / UPSTREAM_BASE_CHECKPOINT_NAME, weights_only=True)
    edit(payload["model"])
    torch.save(payload, run / "checkpoints" / UPSTREAM_BASE_CHECKPOINT_NAME)
    return run


def _set(group: str, key: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda groups: groups[group].__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set("llm_backbone", "llm.model.layers.0.mlp.bogus.weight", torch.zeros(2)),
            r"unexpected keys 1 \(language_model\.model\.layers\.0\.mlp\.bogus\.weight\)",
        ),  # noqa: E501
        (lambda g: g["projector"].pop("projector.2.bias"), r"missing keys 1 \(projector\.fc2\.bias\)"),
        (
            _set("llm_backbone", "llm.model.norm.weight", torch.ones(65)),
            r"language_model\.model\.norm\.weight: file \(65,\) vs model \(64,\)",
        ),  # noqa: E501
        (_set("llm_backbone", "llm.lm_head.weight", torch.zeros(151936, 64)), r"lm_head\.weight differs"),
        (lambda g: g.pop("projector"), r"missing required \['projector'\]"),
    ],
    ids=["unexpected", "missing", "shape", "untied-lm-head", "no-projector-group"],
)
def test_base_checkpoint_errors_name_the_key(tiny, tmp_path, edit, message):
    run = _tampered_base(tiny, tmp_path, edit)
    model = _fresh_model(tiny.base_config_dir)
    with pytest.raises(CheckpointError, match=message):
        load_prismatic_base_checkpoint(model, run)


def test_base_run_config_must_match_the_hf_config(tiny, tmp_path):
    run = _tampered_base(tiny, tmp_path, lambda groups: None)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["llm_backbone_id"] = "llama2-7b-pure"
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="llama2-7b-pure"):
        load_prismatic_base_checkpoint(_fresh_model(tiny.base_config_dir), run)


# --- (c) fine-tuning checkpoint with an unmerged LoRA adapter on a separate base ---
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, inputs):
    """Simulated LoRA fine-tuning of the seed-SEED policy: new action queries, random LoRA on upstream's targets.

    The lm_head LoRA stays zero, as in training (the LM head gets no gradient with the L1 head).
    """
    root = tmp_path_factory.mktemp("lora")
    policy = tool.build_tiny_policy(seed=SEED)
    policy.vla.norm_stats = policy.dataset_statistics
    base_weights = {k: v.clone() for k, v in policy.vla.state_dict().items()}
    policy.vla.save_pretrained(root / "base_hf")
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        policy.vla.action_queries.weight.copy_(torch.randn(policy.vla.action_queries.weight.shape, generator=gen))
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=UPSTREAM_LORA_TARGETS, init_lora_weights="gaussian"
    )
    peft_model = get_peft_model(policy.vla, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and "lm_head" not in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    peft_model.eval()
    ckpt = root / "run--200_chkpt"
    peft_model.save_pretrained(ckpt / "lora_adapter", save_embedding_layers=True)  # upstream stores lm_head base
    save_policy_components(ckpt, "200", policy.action_head, policy.proprio_projector, policy.vla.action_queries)
    write_dataset_statistics(ckpt, policy.dataset_statistics)
    outputs = _outputs(peft_model, policy.action_head, policy.proprio_projector, inputs)
    return {"root": root, "ckpt": ckpt, "peft": peft_model, "outputs": outputs, "base_weights": base_weights}


def test_lora_adapter_has_the_upstream_layout(lora_run):
    keys = load_file(lora_run["ckpt"] / "lora_adapter" / "adapter_model.safetensors")
    assert "base_model.model.language_model.lm_head.base_layer.weight" in keys
    assert "base_model.model.vision_backbone.featurizer.patch_embed.proj.lora_A.weight" in keys
    names = {p.name for p in lora_run["ckpt"].glob("*checkpoint.pt")}
    assert names == {f"{c}--200_checkpoint.pt" for c in ("action_head", "proprio_projector", "action_queries")}


@pytest.mark.parametrize("base", ["hf", "prismatic"])
def test_lora_unmerged_load_is_identical(lora_run, tiny, inputs, base):
    kwargs = {"base_model_dir": lora_run["root"] / "base_hf"}
    if base == "prismatic":  # the tool's base run dir holds the same seed-SEED weights
        kwargs = {"base_model_dir": tiny.base_dir, "base_config_dir": tiny.base_config_dir}
    policy = load_vla_release(lora_run["ckpt"], merge_lora=False, **kwargs)
    assert hasattr(policy.vla, "get_base_model")  # still a PeftModel
    got = _outputs(policy.vla, policy.action_head, policy.proprio_projector, inputs)
    _assert_same_outputs(got, lora_run["outputs"])


def test_lora_merged_load_matches_within_reassociation_error(lora_run, inputs):
    policy = load_vla_release(lora_run["ckpt"], base_model_dir=lora_run["root"] / "base_hf", merge_lora=True)
    assert isinstance(policy.vla, OpenVLAForActionPrediction)
    assert policy.vla.get_output_embeddings().weight is policy.vla.get_input_embeddings().weight  # still tied
    # Independent float64 merge of one LoRA layer: W + (alpha / r) * B @ A. fp32 rounding of the merged sum
    # is <= 2^-24 * |W'| per entry (|W'| < 4 here), so 1e-6 bounds it.
    lora_layer = lora_run["peft"].get_base_model().language_model.model.layers[1].self_attn.q_proj
    name = "language_model.model.layers.1.self_attn.q_proj.weight"
    want = lora_run["base_weights"][name].double() + 2.0 * (
        lora_layer.lora_B["default"].weight.double() @ lora_layer.lora_A["default"].weight.double()
    )
    merged = policy.vla.state_dict()[name]
    assert torch.allclose(merged.double(), want, rtol=0, atol=1e-6)
    # Outputs: merged weights re-associate (x W' vs x W + x A B) in fp32 (eps 6e-8 per op); summed over the
    # ViTs, the projector and 4 LLM layers the error measured ~1.2e-6 of each tensor's max |value|, so 1e-5
    # relative leaves a margin of ~8x, while a key that was not merged/loaded gives differences of order 1.
    got = _outputs(policy.vla, policy.action_head, policy.proprio_projector, inputs)
    _assert_same_outputs(got, lora_run["outputs"], rel=1e-5)


def test_lora_merge_refuses_a_nonzero_tied_lm_head_lora(lora_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(lora_run["ckpt"], ckpt)
    path = ckpt / "lora_adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.language_model.lm_head.lora_B.weight"].fill_(0.01)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tied lm_head"):
        load_vla_release(ckpt, base_model_dir=lora_run["root"] / "base_hf", merge_lora=True)


def test_lora_adapter_from_another_base_is_rejected(lora_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(lora_run["ckpt"], ckpt)
    path = ckpt / "lora_adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.language_model.lm_head.base_layer.weight"][0, 0] += 1.0
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lm_head\.base_layer\.weight.*another base"):
        load_vla_release(ckpt, base_model_dir=lora_run["root"] / "base_hf", merge_lora=False)


def test_lora_checkpoint_without_base_is_an_error(lora_run):
    with pytest.raises(CheckpointError, match="base_model_dir"):
        load_vla_release(lora_run["ckpt"])


def test_unreadable_weight_files_are_named_in_the_error(tmp_path: Path) -> None:
    """A truncated or foreign safetensors file, and a truncated HF model dir, give errors that name the file."""
    from prismatic.extern.hf.configuration_prismatic import tiny_openvla_config
    from prismatic.models.checkpoints import CheckpointError, load_hf_vla, read_safetensors
    from prismatic.training.model_setup import load_start_point

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for bad in (truncated, tmp_path / "missing.safetensors"):
        with pytest.raises(CheckpointError, match=str(bad)):
            read_safetensors(bad)
    assert torch.equal(read_safetensors(good)["w"], torch.arange(1000, dtype=torch.float32))

    config = tiny_openvla_config()
    hf_dir = tmp_path / "hf"
    OpenVLAForActionPrediction(config).save_pretrained(hf_dir)
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match=str(hf_dir)):
        load_hf_vla(hf_dir)
    with pytest.raises(CheckpointError, match=str(hf_dir)):
        load_start_point(str(hf_dir), use_minivlm=False)
