"""Gate rules, reports and history: plain functions over metric rows, no numpy internals."""
