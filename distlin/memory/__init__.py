"""Memory planning: predicted peak bytes per rank before running anything."""

from distlin.memory.planner import format_plan, plan, ranks_needed

__all__ = ["format_plan", "plan", "ranks_needed"]
