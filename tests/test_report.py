"""PatchReport's grouping of sites by pattern, its text, its breakdown by kind, and their rich rendering."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from actpatch.cli import render
from actpatch.report import PatchReport, Projection, Site, SiteGroup, group_sites, savings_by_kind


def llama_like_sites(layers: int = 32) -> list[Site]:
    """The 129 sites of a Llama-3.1-8B dry run, in model order."""
    sites = []
    for i in range(layers):
        mlp = f"model.layers.{i}.mlp"
        sites += [
            Site(mlp, "silu", f"{mlp}.down_proj (linear)", True, None, 53760, "gated"),
            Site(f"{mlp}.act_fn", "silu", f"{mlp} (mul)", False, f"fused into the gated product at {mlp}"),
            Site(
                f"model.layers.{i}.input_layernorm",
                "rms_norm",
                f"model.layers.{i}.self_attn.q_proj (linear)",
                True,
                None,
                16384,
                "norm",
            ),  # fmt: skip
            Site(
                f"model.layers.{i}.post_attention_layernorm",
                "rms_norm",
                f"{mlp}.gate_proj (linear)",
                True,
                None,
                16384,
                "norm",
            ),  # fmt: skip
        ]
    return [*sites, Site("model.norm", "rms_norm", "lm_head (linear)", True, None, 16384, "norm")]


def llama_like_report() -> PatchReport:
    projection = Projection(1, 4096, "bfloat16", 30172987916, 18764481036)
    return PatchReport("meta-llama/Llama-3.1-8B", True, llama_like_sites(), projection)


def _rows(groups: list[SiteGroup]) -> list[tuple]:
    return [(g.path, g.kind, g.count, g.consumer, g.reason) for g in groups]


def test_layers_group_into_one_row_per_pattern():
    groups = group_sites(llama_like_sites())
    assert _rows(groups) == [
        ("model.layers.{0..31}.mlp", "gated", 32, "model.layers.{0..31}.mlp.down_proj (linear)", None),
        (
            "model.layers.{0..31}.mlp.act_fn",
            "activation",
            32,
            "model.layers.{0..31}.mlp (mul)",
            "fused into the gated product at model.layers.{0..31}.mlp",
        ),  # fmt: skip
        (
            "model.layers.{0..31}.input_layernorm",
            "norm",
            32,
            "model.layers.{0..31}.self_attn.q_proj (linear)",
            None,
        ),
        (
            "model.layers.{0..31}.post_attention_layernorm",
            "norm",
            32,
            "model.layers.{0..31}.mlp.gate_proj (linear)",
            None,
        ),  # fmt: skip
        ("model.norm", "norm", 1, "lm_head (linear)", None),
    ]
    assert groups[0].total_bytes_per_token == 32 * 53760
    assert [s.path for s in groups[0].sites] == [f"model.layers.{i}.mlp" for i in range(32)]
    assert sum(g.count for g in groups) == 129


@pytest.mark.parametrize(
    ("layers", "pattern"),
    [
        ([0, 2, 5], "h.{0,2,5}.act"),
        ([0, 1, 2, 7], "h.{0..2,7}.act"),
        ([3], "h.3.act"),
        ([4, 5], "h.{4,5}.act"),
    ],
)
def test_index_sets_print_as_ranges_or_lists(layers, pattern):
    sites = [Site(f"h.{i}.act", "gelu", None, True, None, 10) for i in layers]
    assert [g.path for g in group_sites(sites)] == [pattern]


def test_sites_that_differ_stay_apart():
    sites = [
        Site("h.0.act", "gelu", None, True, None, 10),
        Site("h.1.act", "gelu", None, True, None, 12),  # other bytes
        Site("h.2.act", "relu", None, False, "not invertible"),
        Site("h.3.act", "gelu", None, True, None, 10),
    ]
    assert [(g.path, g.count) for g in group_sites(sites)] == [
        ("h.{0,3}.act", 2),
        ("h.1.act", 1),
        ("h.2.act", 1),
    ]


def test_nested_indices_group_as_full_products():
    """Experts {0..3} of layers {0,1}, but layer 1's expert 2 is excluded: layer 1 gets rows of its own."""
    sites = [
        Site(
            f"l.{i}.experts.{e}.act",
            "silu",
            f"l.{i}.experts.{e}.down (linear)",
            (i, e) != (1, 2),
            None if (i, e) != (1, 2) else "excluded",
            8 if (i, e) != (1, 2) else 0,
        )  # fmt: skip
        for i in range(2)
        for e in range(4)
    ]
    assert [(g.path, g.count, g.consumer) for g in group_sites(sites)] == [
        ("l.0.experts.{0..3}.act", 4, "l.0.experts.{0..3}.down (linear)"),
        ("l.1.experts.{0,1,3}.act", 3, "l.1.experts.{0,1,3}.down (linear)"),
        ("l.1.experts.2.act", 1, "l.1.experts.2.down (linear)"),
    ]
    sites = [Site(f"l.{i}.experts.{e}.act", "silu", None, True, None, 8) for i in range(3) for e in range(4)]
    assert [(g.path, g.count) for g in group_sites(sites)] == [("l.{0..2}.experts.{0..3}.act", 12)]


def test_a_constant_consumer_groups_with_the_layers_it_does_not_match():
    """A consumer number equal to the path's at the same place follows the layer; elsewhere it is a constant
    (so layer 0, whose number matches, gets a row of its own)."""
    sites = [Site(f"h.{i}.act", "gelu", "head.0.proj (linear)", True, None, 10) for i in range(3)]
    assert [(g.path, g.consumer) for g in group_sites(sites)] == [
        ("h.0.act", "head.0.proj (linear)"),
        ("h.{1,2}.act", "head.0.proj (linear)"),
    ]


def test_str_groups_and_to_text_lists_every_site():
    report = llama_like_report()
    text = str(report)
    assert len(text.splitlines()) == 1 + 5 + 2
    assert (
        "  model.layers.{0..31}.mlp  [gated: silu] x32  patched  (-53,760 B/token each, -1,720,320 in all)"
        in text
    )
    assert "not patched: fused into the gated product at model.layers.{0..31}.mlp" in text
    assert "freed by kind: gated MLPs 7,046,430,720 B (23.4%), norms 4,362,076,160 B (14.5%)" in text
    every = report.to_text(all_sites=True)
    assert len(every.splitlines()) == 1 + 129 + 2 and "model.layers.31.post_attention_layernorm" in every


def test_savings_by_kind_add_up_to_the_saving():
    report = llama_like_report()
    kinds = savings_by_kind(report)
    assert [(k.label, k.sites) for k in kinds] == [("gated MLPs", 32), ("norms", 65)]
    assert sum(k.saved_bytes for k in kinds) == report.projection.saved_bytes
    assert sum(k.share for k in kinds) == pytest.approx(report.projection.saved_fraction)


def test_to_dict_keeps_every_site():
    assert len(llama_like_report().to_dict()["sites"]) == 129


def _render(report, width: int, **kwargs) -> str:
    console = Console(record=True, width=width)
    render.render_report(console, report, **kwargs)
    return console.export_text()


_PATHISH = re.compile(r"[\w{}.…]*\.[\w{}.…]*")


def _assert_no_path_is_split(text: str, paths: set[str]) -> None:
    """Every path-like token printed is a whole path, or one cut in the middle with '…' (never folded)."""
    for token in _PATHISH.findall(text):
        if "…" in token:
            head, tail = token.split("…")
            assert any(p.startswith(head) and p.endswith(tail) for p in paths), token
        else:
            assert token in paths or not any(c.isalpha() for c in token), token


@pytest.mark.parametrize("width", [60, 80, 100, 160])
@pytest.mark.parametrize("all_sites", [False, True])
def test_rendered_paths_never_wrap_mid_name(width, all_sites):
    report = llama_like_report()
    groups = [SiteGroup.of(s) for s in report.sites] if all_sites else group_sites(report.sites)
    paths = {w.rstrip(":") for g in groups for w in f"{g.path} {g.consumer} {g.reason}".split()}
    text = _render(report, width, all_sites=all_sites)
    assert all(len(line) <= width for line in text.splitlines())
    _assert_no_path_is_split(text, paths | {"meta-llama/Llama-3.1-8B"})
    assert ("…" in text) == (width < 100)


def test_grouped_table_at_80_columns():
    text = _render(llama_like_report(), 80)
    lines = [line.rstrip() for line in text.splitlines()]
    assert "model.layers.{0..31}.mlp            gated silu  yes      32 × 53,760  1,720,320" in lines
    assert "…{0..31}.post_attention_layernorm   rms_norm    yes      32 × 16,384    524,288" in lines
    assert "freed by kind:  gated MLPs  32 sites  6.56 GiB  23.4%" in lines
    assert len(lines) < 20


def test_consumers_show_where_there_is_room():
    assert "consumer" not in _render(llama_like_report(), 80)
    wide = _render(llama_like_report(), 160)
    assert "model.layers.{0..31}.self_attn.q_proj (linear)" in wide


def test_middle_truncate_keeps_both_ends():
    assert (
        render.middle_truncate("model.layers.{0..31}.post_attention_layernorm", 20) == "model.…ion_layernorm"
    )
    assert render.middle_truncate("short", 20) == "short"
    path = "model.layers.{0..31}.input_layernorm"
    assert render.middle_truncate(path, 35) == "model.layer…{0..31}.input_layernorm"
    assert render.middle_truncate("model.layers.{0..31}.post_attention_layernorm", 34) == (
        "…{0..31}.post_attention_layernorm"
    )
