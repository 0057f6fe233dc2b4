"""Distillation on the shared trainer (compress/train): a teacher's outputs as the student's targets.

  losses      KD losses over student and teacher logits (or the teacher's top-k): forward and
              reverse KL on temperature-softened distributions, generalized JSD, mixed with CE
  students    students made from the teacher by dropping layers
  teacher_cache  an offline teacher: its top-k log-probs over the rows, stored once (resumable), read every epoch
  pruning     students made narrower: MLP channels and attention heads kept by importance on calibration text
"""
