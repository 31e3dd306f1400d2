"""Help text of the `flatquant` command: examples, and every option's default shown."""
from __future__ import annotations

import argparse

EXAMPLES = """examples:
  flatquant quantize --model smollm2-135m --preset cpu-quick --output out/smollm2-w4a4kv4
  flatquant eval --model smollm2-135m --method quarot --w-bits 4 --a-bits 4 --kv-bits 4 --dataset wikitext2,c4
  flatquant eval --model smollm2-135m --method flatquant --params out/smollm2-w4a4kv4 --dataset wikitext2
"""
USER_RESULTS = "flatquant-results"  # git-ignored; benchmark scripts pass --results-dir results explicitly


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends each option's default to its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if action.option_strings and d is not None and d is not False and d != argparse.SUPPRESS \
                and "default" not in text:
            text += f" (default: {d!r})" if d == "" else f" (default: {d})"
        return text
