"""The commands: training stages, evaluation, checkpoint conversion, planning, the demo."""
