"""What fits before you submit: a per-rank memory and step-time model and a layout planner (megaring-plan)."""

from megaring.plan.memory import Estimate, Hardware, Layout, estimate, grad_bytes, state_bytes
from megaring.plan.planner import Plan, candidate_layouts, describe, longest_seq_len, plan

__all__ = ["Estimate", "Hardware", "Layout", "Plan", "candidate_layouts", "describe", "estimate", "longest_seq_len",
           "grad_bytes", "plan", "state_bytes"]
