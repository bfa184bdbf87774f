"""Trainer core: the train state, the jitted step, the loop, optimizer, checkpoints, mesh."""
