"""Data: label maps, dataset preparation, the grain input pipeline, RCS, the synthetic benchmark."""
