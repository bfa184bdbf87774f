"""UDA terms of the train step: EMA teacher, pseudo-labels, ClassMix, augmentation, MIC, FD, MFM."""
