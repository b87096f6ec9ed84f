"""`g4seg eval`: datasets (VOC-style folders, coarse masks), runner (JSONL, resume,
shards), report (summary.json/csv, report.html, grid.png), cli (argparse wiring).
See docs/EVALUATION.md."""
