"""Run-time services shared by the commands: errors, locks, signals, progress, metric files."""
