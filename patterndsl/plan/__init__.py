"""The planner: how to run a program (backend per stage, tile layouts, costs). The pattern never changes."""
