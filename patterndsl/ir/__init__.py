"""The IR: mask algebra, predicates, stages and programs (what is computed, never how)."""
