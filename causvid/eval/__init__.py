"""Evaluation: shapes-bench scores generated videos against the requested scene."""

from causvid.eval.shapes_bench import (
    METRICS,
    BenchCase,
    analyze_video,
    contact_sheet,
    default_prompt_set,
    format_table,
    run_bench,
)

__all__ = ["METRICS", "BenchCase", "analyze_video", "contact_sheet", "default_prompt_set", "format_table", "run_bench"]
