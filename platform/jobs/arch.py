"""``timfusion arch show``: a genotype's structure, parameter count and MACs."""

from __future__ import annotations

import textwrap
from typing import Any

from omegaconf import DictConfig

from timfusion.platform.errors import UserError, check_size
from timfusion.platform.jobs import command


def _gmac(macs: int) -> str:
    return f"{macs / 1e9:.3f}"


def _head_text(module) -> str:
    import torch.nn as nn

    parts = []
    for layer in module:
        if isinstance(layer, nn.Conv2d):
            k = layer.kernel_size[0]
            parts.append(f"conv{k}x{k} {layer.in_channels}->{layer.out_channels}")
        elif isinstance(layer, nn.PReLU):
            parts[-1] += " PReLU"
        elif isinstance(layer, nn.BatchNorm2d):
            parts[-1] += " BN"
        elif isinstance(layer, nn.Tanh):
            parts.append("tanh")
    return ", ".join(parts)


def show_architecture(genotype_ref: str, height: int, width: int) -> dict[str, Any]:
    """Print the structure table of ``genotype_ref`` at ``height`` x ``width``; return the totals."""
    from timfusion.search_spaces.cells import Cell
    from timfusion.search_spaces.genotype import load_genotype
    from timfusion.search_spaces.network import (
        FusionNetwork,
        count_macs,
        count_parameters,
        mac_profile,
        size_report,
    )

    genotype = load_genotype(genotype_ref)
    model = FusionNetwork(genotype).eval()
    profile = mac_profile(model, height, width)
    names = {id(m): n for n, m in model.named_modules()}
    total_params, total_macs = count_parameters(model), sum(profile.values())

    def macs_of(module) -> int:
        prefix = names[id(module)] + "."
        return sum(v for k, v in profile.items() if k.startswith(prefix))

    print(
        f"genotype {genotype.name}: width {genotype.width}, stem 2 -> {genotype.stem_channels} -> "
        f"{genotype.width}, input multiple {genotype.multiple}"
    )
    if genotype.description:
        print(textwrap.fill(genotype.description, 100, initial_indent="  ", subsequent_indent="  "))
    labels = {}
    if genotype.stage2 is not None:
        labels = {f"stage2.branches.{i}": b.label for i, b in enumerate(genotype.stage2.branches) if b.label}
    rows: list[tuple[str, str, str, str]] = []
    for part, module, params, macs in size_report(model, height, width, profile):
        if isinstance(module, Cell):
            spec = dict(genotype.cells())[part]
            rows.append((part, f"{spec.type} cell, C={module.channels}", f"{params:,}", _gmac(macs)))
            by_position: dict[int, list] = {}
            for slot, op in module.op_slots():
                by_position.setdefault(slot.position, []).append((slot, op))
            for position, slots in by_position.items():
                channels = "/".join(str(slot.channels) for slot, _ in slots)
                p = sum(count_parameters(op) for _, op in slots)
                m = sum(macs_of(op) for _, op in slots)
                rows.append(
                    (
                        f"  position {position}",
                        f"{module.op_names[position]} @ C={channels}",
                        f"{p:,}",
                        _gmac(m),
                    )
                )
            continue
        branch = part.rsplit(".", 1)[0] if part.startswith("stage2.branches") else ""
        label = f" ({labels[branch]})" if branch in labels else ""
        if part.endswith("stem"):
            text = "stem: " + _head_text(module)
        elif part == "stage2.gate":
            k = genotype.stage2.mask_branch if genotype.stage2 is not None else 0
            text = f"mask gate: sigmoid(conv1x1 [max, mean] of branch {k})"
        elif part.endswith("aux"):
            text = "auxiliary head: " + _head_text(module)
        else:
            merge = f" ({genotype.stage2.merge} merge)" if part == "stage2.head" and genotype.stage2 else ""
            text = f"head{merge}: " + _head_text(module)
        rows.append((part, text + label, f"{params:,}", _gmac(macs)))
    rows.append(("total", f"at {height}x{width}", f"{total_params:,}", _gmac(total_macs)))
    header = ("part", "structure", "parameters", f"GMAC@{height}x{width}")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for i, row in enumerate([header, *rows]):
        if i == len(rows):
            print("-" * (sum(widths) + 6))
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}")
    print(
        f"{genotype.name}: {total_params:,} parameters, {total_macs / 1e9:.3f} GMAC ({total_macs:,} MACs) "
        f"at {height}x{width}"
    )
    inference_macs = count_macs(model, height, width, full=False)
    if inference_macs != total_macs:
        print(f"inference (fuse, without the auxiliary heads): {inference_macs / 1e9:.3f} GMAC")
    print("MACs: multiply-accumulates of the conv, transposed-conv, 1-D conv and linear layers (batch 1)")
    return {
        "genotype": genotype.name,
        "parameters": total_params,
        "macs": total_macs,
        "inference_macs": inference_macs,
        "size": [height, width],
    }


@command("arch show", config="arch_show", summary="print a genotype's structure, parameters and MACs")
def arch_show(cfg: DictConfig) -> dict[str, Any]:
    height, width = check_size("size", cfg.size)
    if cfg.genotype is None or str(cfg.genotype) == "":
        raise UserError("genotype: required (a named genotype or a genotype .json path)")
    return show_architecture(str(cfg.genotype), height, width)
