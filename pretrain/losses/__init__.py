"""Loss functions and teacher-target normalisation for self-distillation objectives."""
