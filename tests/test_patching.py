"""patch_model / unpatch_model over tiny models of many families: same losses, close gradients, fewer
saved bytes (by what the report projects), idempotence, exact restore, unchanged state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, LLAMA_BLOCKS, saved_bytes, tiny_model

import actpatch
from actpatch import in_place
from actpatch.analysis.inputs import input_spec
from actpatch.patching import patched_modules

BATCH, SEQ = 2, 12


def _seeded(model, kwargs):
    torch.manual_seed(1)  # the same dropout masks in every forward
    return saved_bytes(model, kwargs)


def _step(model, kwargs):
    model.zero_grad(set_to_none=True)
    nbytes, loss = _seeded(model, kwargs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return nbytes, loss.detach(), grads


@pytest.mark.parametrize("gated", [False, True], ids=["activations", "gated"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_keeps_loss_close_grads_and_saves_what_it_projects(family, gated):
    model = tiny_model(family)
    _, kwargs = input_spec(model).make(BATCH, SEQ)
    before_bytes, before_loss, before_grads = _step(model, kwargs)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    report = actpatch.patch_model(model, batch_size=BATCH, seq_len=SEQ, gated=gated)
    after_bytes, after_loss, after_grads = _step(model, kwargs)

    torch.testing.assert_close(after_loss, before_loss, rtol=1e-5, atol=1e-6)
    assert after_grads.keys() == before_grads.keys()
    for name, g in before_grads.items():
        err = (after_grads[name] - g).norm()
        assert err <= 2e-3 * g.norm() + 1e-6, (name, float(err), float(g.norm()))
    assert after_bytes <= before_bytes
    projected = report.projection
    assert projected.saved_bytes == pytest.approx(before_bytes - after_bytes, rel=0.02, abs=64)
    assert projected.activation_bytes_before == pytest.approx(before_bytes, rel=0.02)
    assert set(model.state_dict()) == set(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize(
    ("family", "gated"), [("gpt2", False), ("llama", False), ("llama", True), ("whisper", False),
                          ("clip", False), ("mixtral", False), ("gemma", True), ("phi3", True)]
)  # fmt: skip
def test_second_patch_changes_nothing_and_unpatch_restores_exactly(family, gated):
    model = tiny_model(family)
    _, kwargs = input_spec(model).make(BATCH, SEQ)
    originals = dict(model.named_modules())
    reference_bytes, reference_loss = _seeded(model, kwargs)
    keys = list(model.state_dict())

    first = actpatch.patch_model(model, gated=gated)
    swapped = dict(model.named_modules())
    second = actpatch.patch_model(model, gated=gated)
    assert dict(model.named_modules()) == swapped
    assert [(s.path, s.patched, s.reason) for s in second.sites] == [
        (s.path, s.patched, s.reason) for s in first.sites
    ]
    assert second.projection == first.projection
    assert list(model.state_dict()) == keys
    assert set(patched_modules(model)) == {s.path for s in first.patched_sites}

    restored = actpatch.unpatch_model(model)
    assert sorted(restored) == sorted(s.path for s in first.patched_sites)
    after = dict(model.named_modules())
    assert after.keys() == originals.keys()
    assert all(after[k] is originals[k] for k in originals)
    assert not any("forward" in m.__dict__ for m in model.modules())  # fused MLPs have their class's back
    nbytes, loss = _seeded(model, kwargs)
    assert nbytes == reference_bytes
    assert torch.equal(loss, reference_loss)
    assert actpatch.unpatch_model(model) == []


def test_include_exclude_select_sites():
    model = tiny_model("llama")
    layer1 = [f"model.layers.1.{p}" for p in ("mlp", "input_layernorm", "post_attention_layernorm")]
    report = actpatch.patch_model(model, include=["model.layers.1.*"])
    assert [s.path for s in report.patched_sites] == layer1
    for path in ("model.layers.0.mlp", "model.layers.0.input_layernorm", "model.norm"):
        assert next(s for s in report.sites if s.path == path).reason == "excluded by include/exclude"
    assert set(patched_modules(model)) == set(layer1)

    model = tiny_model("llama")
    report = actpatch.patch_model(model, exclude=["*.layers.0.*", "model.norm"])
    assert [s.path for s in report.patched_sites] == layer1
    report = actpatch.patch_model(tiny_model("llama"), include=["*.act_fn"], gated=False, norms=False)
    assert [s.path for s in report.patched_sites] == [
        "model.layers.0.mlp.act_fn",
        "model.layers.1.mlp.act_fn",
    ]
    assert actpatch.patch_model(tiny_model("llama"), include=[]).patched_sites == []


def test_analyze_changes_nothing_and_reports_patched_sites_of_a_patched_model():
    model = tiny_model("gpt2")
    modules = dict(model.named_modules())
    rng = torch.get_rng_state()
    report = actpatch.analyze(model)
    assert dict(model.named_modules()) == modules
    assert torch.equal(torch.get_rng_state(), rng)
    actpatch.patch_model(model)
    again = actpatch.analyze(model)
    assert [s.patched for s in again.sites] == [s.patched for s in report.sites]
    assert again.projection == report.projection


def test_eval_mode_model_is_patched_and_keeps_its_mode():
    model = tiny_model("bert").eval()
    report = actpatch.patch_model(model)
    assert [s.kind for s in report.patched_sites].count("activation") == 3
    assert [s.kind for s in report.patched_sites].count("norm") == 4  # the head's: its input kept by its GELU
    assert not any(m.training for m in model.modules())
    model.train()
    _, kwargs = input_spec(model).make(BATCH, SEQ)
    reference = copy.deepcopy(model)
    actpatch.unpatch_model(reference)
    assert torch.equal(_seeded(model, kwargs)[1], _seeded(reference, kwargs)[1])


def test_lora_model_is_patched_where_frozen_layers_still_save_the_output():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["down_proj"], lora_dropout=0.0, init_lora_weights=False)
    )
    _, kwargs = input_spec(model).make(BATCH, SEQ)
    before_bytes, before_loss, before_grads = _step(model, kwargs)
    report = actpatch.patch_model(model, batch_size=BATCH, seq_len=SEQ)
    # Layer 0 sees no gradient yet (everything before its down_proj is frozen); in layer 1 the gated MLP
    # is fused.  Its float32 norms with frozen weights keep x and 1/rms already: nothing to gain.
    root = "base_model.model.model."
    for path in ("layers.0.mlp.act_fn", "layers.0.input_layernorm", "layers.0.post_attention_layernorm"):
        assert next(s for s in report.sites if s.path == root + path).reason.startswith("no gradient flows")
    assert [s.path for s in report.patched_sites] == [f"{root}layers.1.mlp"]
    assert next(s for s in report.sites if s.path == f"{root}norm").reason == "nothing to gain"
    after_bytes, after_loss, after_grads = _step(model, kwargs)
    torch.testing.assert_close(after_loss, before_loss)
    assert before_bytes - after_bytes == pytest.approx(report.projection.saved_bytes, rel=0.02)
    for name, g in before_grads.items():
        assert (after_grads[name] - g).norm() <= 2e-3 * g.norm() + 1e-6, name


def test_lora_dropout_before_frozen_consumer_leaves_nothing_to_gain():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("gpt_neox"), peft.LoraConfig(r=4, target_modules=["dense_4h_to_h"], lora_dropout=0.1)
    )
    report = actpatch.patch_model(model)
    assert report.patched_sites == []
    # Layer 1: dropout feeds lora_A, and the frozen base Linear keeps no input.
    activations = [s for s in report.sites if s.kind == "activation"]
    assert activations[1].reason.startswith("output not saved"), activations[1]


GATED_FAMILIES = {
    *("llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "deepseek_v3", "qwen2_moe", "phi3"),
    *("t5", "modernbert"),  # dropout between the product and the down projection
}


@pytest.mark.parametrize("family", FAMILIES)
def test_gated_mlps_are_found_by_what_ran(family):
    """Fused where the MLP's forward is exactly down(act(gate(x)) * up(x)) (or down(dropout(...)): t5,
    modernbert), or an MoE experts module's _apply_gate is exactly act(gate) * up of its input's halves
    (mixtral, qwen2_moe, deepseek_v3); with a fused gate_up projection (phi3, modernbert) too; never
    in non-gated MLPs."""
    model = tiny_model(family)
    _, kwargs = input_spec(model).make(BATCH, SEQ)
    reference = _seeded(model, kwargs)[1]
    report = actpatch.patch_model(model, batch_size=BATCH, seq_len=SEQ, gated=True)
    fused = [s for s in report.patched_sites if s.kind == "gated"]
    assert bool(fused) == (family in GATED_FAMILIES), [s.path for s in fused]
    for site in fused:
        act = next(s for s in report.sites if s.path.startswith(site.path + ".") and s.kind == "activation")
        assert act.reason == f"fused into the gated product at {site.path}"
        assert site.consumer.startswith(site.path)  # the down projection (a child, or an MoE's grouped mm)
    loss = _seeded(model, kwargs)[1]
    if all(s.kind == "gated" for s in report.patched_sites):  # the fused forward is torch's, bitwise
        assert torch.equal(loss, reference)
    else:
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


class _MovingMLP(torch.nn.Module):
    """down(silu(gate(x)) * up(x)) after ``x.to(x.device).contiguous()`` or ``x.to(torch.float32)``: no-ops
    in float32."""

    def __init__(self, cast: bool):
        super().__init__()
        self.gate, self.up, self.down = (torch.nn.Linear(8, 8) for _ in range(3))
        self.act, self.cast = torch.nn.SiLU(), cast

    def forward(self, x):
        x = x.to(torch.float32) if self.cast else x.to(x.device).contiguous()
        return self.down(self.act(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("cast", [False, True], ids=["device", "dtype"])
def test_a_no_op_move_is_not_part_of_an_mlp_but_a_cast_is(cast):
    """A ``.to(device)`` or ``.contiguous()`` that returns its input (accelerate's hooks do this) leaves the
    MLP fusable; a ``.to(dtype)`` is a cast in another dtype, so the MLP is not fused (the fused forward
    would skip it) and its activation is inverted alone."""
    model = torch.nn.Sequential(_MovingMLP(cast), torch.nn.Linear(8, 1))
    report = actpatch.patch_model(model, example_inputs=torch.randn(4, 8, requires_grad=True), norms=False)
    assert [(s.path, s.kind) for s in report.patched_sites] == [
        ("0.act", "activation") if cast else ("0", "gated")
    ]


class _SwiGLU(torch.nn.Module):
    """timm's ``SwiGLU``: act(fc1_g(x)) * fc1_x(x), then drop1, norm (nn.Identity), fc2, drop2."""

    def __init__(self, drop1: float = 0.0, drop2: float = 0.0):
        super().__init__()
        self.fc1_g, self.fc1_x, self.fc2 = (
            torch.nn.Linear(8, 16),
            torch.nn.Linear(8, 16),
            torch.nn.Linear(16, 8),
        )
        self.act, self.norm = torch.nn.SiLU(), torch.nn.Identity()
        self.drop1, self.drop2 = torch.nn.Dropout(drop1), torch.nn.Dropout(drop2)

    def forward(self, x):
        x_gate = self.fc1_g(x)
        x = self.fc1_x(x)
        x = self.act(x_gate) * x
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        return self.drop2(x)


class _GluMlp(torch.nn.Module):
    """timm's ``GluMlp``: the halves of fc1(x), act on the first (on the second: ``gate_last``), then drop1,
    norm (nn.Identity), fc2, drop2."""

    def __init__(self, gate_last: bool = False, drop1: float = 0.0, drop2: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(16, 8)
        self.act, self.norm, self.gate_last = (
            torch.nn.GELU(approximate="tanh"),
            torch.nn.Identity(),
            gate_last,
        )
        self.drop1, self.drop2 = torch.nn.Dropout(drop1), torch.nn.Dropout(drop2)

    def forward(self, x):
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        return self.drop2(x)


class _Residual(torch.nn.Module):
    """A loss over x + mlp(x) (a ViT block's MLP half); ``layers``: MLPs in an nn.ModuleList, called by it."""

    def __init__(self, mlp: torch.nn.Module | None = None, layers: list[torch.nn.Module] = ()):
        super().__init__()
        self.mlp, self.layers, self.head = mlp, torch.nn.ModuleList(layers), torch.nn.Linear(8, 1)

    def forward(self, x):
        for layer in [self.mlp] if self.mlp is not None else self.layers:
            x = x + layer(x)
        return self.head(x).square().mean()


def _patched_against_eager(model, x, **options):
    """Patch ``model`` (with ``options``, probed on ``x`` of 4 x 6 tokens): its report, and that it keeps the
    loss and the gradients (float32: within 1e-5) and saves the bytes it projects (within 2%)."""
    before_bytes, before_loss, before_grads = _step(model, {"x": x})
    report = actpatch.patch_model(model, example_inputs=x, batch_size=4, seq_len=6, norms=False, **options)
    after_bytes, after_loss, after_grads = _step(model, {"x": x})
    torch.testing.assert_close(after_loss, before_loss, rtol=1e-5, atol=0)
    for name, g in before_grads.items():
        assert (after_grads[name] - g).norm() <= 1e-5 * g.norm(), name
    assert report.projection.saved_bytes == pytest.approx(before_bytes - after_bytes, rel=0.02)
    return report


@pytest.mark.parametrize(
    "mlp", [_SwiGLU, lambda: _GluMlp(gate_last=False), lambda: _GluMlp(gate_last=True)],
    ids=["SwiGLU", "GluMlp", "GluMlp-gate-last"],
)  # fmt: skip
def test_timm_mlps_are_fused_past_children_that_stay_the_identity(mlp):
    """timm's SwiGLU and GluMlp call drop1 (nn.Dropout(0)), norm (nn.Identity) and drop2 (nn.Dropout(0))
    around fc2: those return their input in training too, so they hide no pattern; the fused forward skips
    them."""
    torch.manual_seed(0)
    model = _Residual(mlp())
    report = _patched_against_eager(model, torch.randn(4, 6, 8))
    assert [(s.path, s.kind) for s in report.patched_sites] == [("mlp", "gated")]
    plan = in_place.plan_of(model.mlp)
    assert plan.split == (
        "" if isinstance(model.mlp, _SwiGLU) else "up_first" if model.mlp.gate_last else "gate_first"
    )
    assert report.projection.saved_bytes > 0
    model = _Residual(mlp())
    model.mlp.norm = model.mlp.drop2 = _Doubling()  # return their input, changed: no identity, no gated MLP
    report = actpatch.analyze(model, example_inputs=torch.randn(4, 6, 8), norms=False)
    assert not any(s.kind == "gated" for s in report.sites)


@pytest.mark.parametrize("mlp", [_SwiGLU, _GluMlp], ids=["swiglu", "glumlp"])
def test_a_skipped_dropout_given_p_after_patching_is_an_error(mlp):
    """A child the fused forward skips because it was the identity must stay so: a dropout given p > 0
    later is an error naming actpatch, never silently skipped."""
    model = _Residual(mlp())
    x = torch.randn(4, 6, 8)
    actpatch.patch_model(model, example_inputs=x)
    assert in_place.plan_of(model.mlp).skipped
    model.mlp.drop1.p = 0.1
    with pytest.raises(RuntimeError, match="actpatch: drop1 of this fused gated MLP"):
        model(x)
    actpatch.unpatch_model(model)
    actpatch.patch_model(model, example_inputs=x)  # drop1 drops now: called, or the MLP left unfused
    plan = in_place.plan_of(model.mlp)
    assert plan is None or "drop1" not in plan.skipped
    model(x)


class _Doubling(torch.nn.Module):
    def forward(self, x):
        return x.mul_(2)


@pytest.mark.parametrize("drop", ["drop1", "drop2"])
@pytest.mark.parametrize("dropouts", [False, True])
def test_a_dropout_that_drops_is_called_by_the_fused_forward(drop, dropouts):
    """In training, Dropout(0.1) is no identity: the fused forward calls it where it ran (the same mask: the
    same random stream), as drop1 between the product and fc2, as drop2 after fc2 (two children after the
    product, the pattern's "between" and "down")."""
    torch.manual_seed(0)
    model = _Residual(_GluMlp(**{drop: 0.1})).train()
    report = _patched_against_eager(model, torch.randn(4, 6, 8), dropouts=dropouts)
    fused = {("mlp", "gated")} | ({(f"mlp.{drop}", "dropout")} if dropouts else set())
    assert {(s.path, s.kind) for s in report.patched_sites} == fused
    plan = in_place.plan_of(model.mlp)
    assert (plan.between, plan.down) == (("drop1", "fc2") if drop == "drop1" else ("fc2", "drop2"))


def test_a_gated_mlp_in_a_module_list_is_fused():
    """MLPs held in an nn.ModuleList are called by the list's owner, two levels above them (the list itself
    never runs): each is fused."""
    torch.manual_seed(0)
    model = _Residual(layers=[_MovingMLP(cast=False) for _ in range(2)])
    report = _patched_against_eager(model, torch.randn(4, 6, 8))
    assert [(s.path, s.kind) for s in report.patched_sites] == [("layers.0", "gated"), ("layers.1", "gated")]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_experts_fuse_their_apply_gate_only_when_it_runs(family):
    """grouped_mm (transformers' default) calls _apply_gate once: fused, gradients kept.  The eager
    implementation loops over experts without it: not fused, activation not inverted (the gate_up buffer
    stays saved by the product)."""
    model = tiny_model(family)
    _, kwargs = input_spec(model).make(BATCH, SEQ)
    _, ref_loss, ref_grads = _step(model, kwargs)
    report = actpatch.patch_model(model, batch_size=BATCH, seq_len=SEQ, norms=False)
    experts = [s for s in report.patched_sites if s.path.endswith(".mlp.experts")]
    assert len(experts) == 2 and all(s.kind == "gated" for s in experts)
    assert all(in_place.plan_of(model.get_submodule(s.path)).entry == "_apply_gate" for s in experts)
    _, loss, grads = _step(model, kwargs)
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        assert (grads[name] - g).norm() <= 1e-5 * g.norm() + 1e-7, name
    actpatch.unpatch_model(model)
    assert not any(in_place.is_patched(m) or "_apply_gate" in vars(m) for m in model.modules())

    model.set_experts_implementation("eager")
    report = actpatch.analyze(model, batch_size=BATCH, seq_len=SEQ, norms=False)
    acts = [s for s in report.sites if s.path.endswith(".mlp.experts.act_fn")]
    assert acts and all(s.reason.startswith("input kept alive") for s in acts)
    assert not any(s.path.endswith(".mlp.experts") for s in report.sites)


def test_gated_include_exclude_name_the_mlp_or_its_activation():
    model = tiny_model("llama")
    only_first = actpatch.analyze(model, include=["model.layers.0.mlp"])
    assert [s.path for s in only_first.patched_sites] == ["model.layers.0.mlp"]
    by_act = actpatch.analyze(model, include=["*.act_fn"])
    assert {s.path for s in by_act.patched_sites} == {"model.layers.0.mlp", "model.layers.1.mlp"}
    # Excluding the MLP leaves its activation to be inverted on its own.
    no_fusion = actpatch.analyze(model, norms=False, exclude=["model.layers.1.mlp"])
    assert {s.path for s in no_fusion.patched_sites} == {"model.layers.0.mlp", "model.layers.1.mlp.act_fn"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe", "phi3", "gemma", "t5"])
def test_gpu_default_patch_in_bf16_keeps_loss_and_gradients(family):
    """The defaults on CUDA in bf16 (Triton gated kernels, MoE grouped mm, Phi-3's chunk views, RMSNorms):
    the loss within bf16 rounding, and each gradient as close to the float32 model's as eager bf16's is
    (within twice its distance, plus 1% of the gradient: bf16 rounding alone moves small-norm gradients,
    such as a norm's weight summed over tokens, by several percent either way)."""
    model = tiny_model(family).to("cuda")
    _, kwargs = input_spec(model).make(4, 32)
    exact = _step(model, kwargs)[2]  # float32
    model.to(torch.bfloat16)
    before_bytes, loss, grads = _step(model, kwargs)
    report = actpatch.patch_model(model, batch_size=4, seq_len=32)
    assert {s.kind for s in report.patched_sites} >= {"norm"}
    after_bytes, loss2, grads2 = _step(model, kwargs)
    torch.testing.assert_close(loss2, loss, rtol=2e-2, atol=1e-3)
    for name, g in exact.items():
        eager_err, ours_err = ((h[name].float() - g).norm() for h in (grads, grads2))
        assert ours_err <= 2 * eager_err + 1e-2 * g.norm() + 1e-5, (name, float(ours_err), float(eager_err))
    assert report.projection.saved_bytes == pytest.approx(before_bytes - after_bytes, rel=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_defaults_on_a_model_spread_over_two_gpus():
    """A tiny Llama dispatched over cuda:0 and cuda:1 by accelerate (what ``from_pretrained(device_map=...)``
    does): patched with the defaults, each layer's kernels run on its own device; loss and gradients as
    unpatched, within float32 summation order."""
    from accelerate import dispatch_model

    layout = {block: int(i >= 3) for i, block in enumerate(LLAMA_BLOCKS)}  # layers.1 onwards on cuda:1
    model = dispatch_model(tiny_model("llama"), device_map=layout)
    _, kwargs = input_spec(model).make(4, 32)
    _, loss, grads = _step(model, kwargs)
    report = actpatch.patch_model(model, batch_size=4, seq_len=32)
    assert {s.path for s in report.patched_sites} >= {"model.layers.0.mlp", "model.layers.1.mlp"}
    _, loss2, grads2 = _step(model, kwargs)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        assert grads2[name].device == g.device
        assert (grads2[name] - g).norm() <= 2e-3 * g.norm() + 1e-6, name


def test_gated_mlp_is_not_fused_where_inverting_the_activation_alone_frees_more():
    """A frozen down projection keeps no input: fusing would have to keep the product itself (gain n - 2
    bit masks per element) where inverting the SiLU alone frees its input (n - 1 mask)."""
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp.down_proj.requires_grad_(False)
    report = actpatch.analyze(model, batch_size=BATCH, seq_len=SEQ, norms=False)
    assert {s.path for s in report.patched_sites} == {f"model.layers.{i}.mlp.act_fn" for i in range(2)}
    assert not any(s.kind == "gated" for s in report.sites)


def test_a_string_pattern_is_one_pattern():
    model = tiny_model("llama")
    only_layer0 = actpatch.analyze(model, include="model.layers.0.*")
    assert {s.path for s in only_layer0.patched_sites} == {
        "model.layers.0.mlp", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm"
    }  # fmt: skip
    not_layer1 = actpatch.analyze(model, exclude="model.layers.1.*")
    assert {s.path for s in not_layer1.patched_sites} == {s.path for s in only_layer0.patched_sites} | {
        "model.norm"
    }
    with pytest.raises(TypeError, match="include must be a pattern"):
        actpatch.analyze(model, include=3)


@pytest.mark.parametrize("dtype", ["int8", "bool", "complex64", "float8_e4m3fn", torch.int32, "nonsense"])
def test_a_dtype_that_is_not_a_float_is_refused(dtype):
    with pytest.raises(ValueError, match="unsupported dtype .*: actpatch projects float32, bfloat16"):
        actpatch.analyze(tiny_model("llama"), dtype=dtype)


def _described(model, report):
    """The report's patched sites and the model's, each with its kind."""
    reported = {(s.path, s.kind) for s in report.patched_sites}
    actual = {(p, actpatch.kinds.kind_of(m).name) for p, m in patched_modules(model).items()}
    return reported, actual


@pytest.mark.parametrize(
    ("first", "second"),
    [({"gated": False}, {"gated": True}), ({"gated": True}, {"gated": False}),
     ({"dropouts": True}, {"dropouts": False}), ({"norms": True}, {"norms": False})],
)  # fmt: skip
def test_a_second_patch_with_other_options_reports_the_model_as_it_is(first, second):
    """Later options choose what a call adds; what is patched stays patched and is reported, and a gated
    MLP fused later takes over its activation (restored: the fused forward does not call it)."""
    family = "gpt2" if "dropouts" in first else "llama"
    model = tiny_model(family)
    _, kwargs = input_spec(model).make(BATCH, SEQ)
    _, ref_loss, ref_grads = _step(model, kwargs)
    first_report = actpatch.patch_model(model, batch_size=BATCH, seq_len=SEQ, **first)
    report = actpatch.patch_model(model, batch_size=BATCH, seq_len=SEQ, **second)
    reported, actual = _described(model, report)
    assert reported == actual and actual
    _, loss, grads = _step(model, kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        assert (grads[name] - g).norm() <= 2e-3 * g.norm() + 1e-6, name
    if first == {"gated": False}:
        act = model.model.layers[0].mlp.act_fn
        assert type(act).__name__ == "SiLUActivation" and ("model.layers.0.mlp", "gated") in actual
    if first == {"dropouts": True}:
        dropouts = {(s.path, "dropout") for s in first_report.patched_sites if s.kind == "dropout"}
        assert dropouts and dropouts <= actual
