"""What fits before you submit: a per-rank memory and step-time model and a layout planner (megaring-plan)."""

from megaring.plan.memory import Estimate, Hardware, Layout, estimate, state_bytes
from megaring.plan.planner import Plan, candidate_layouts, describe, plan

__all__ = ["Estimate", "Hardware", "Layout", "Plan", "candidate_layouts", "describe", "estimate", "plan",
           "state_bytes"]
