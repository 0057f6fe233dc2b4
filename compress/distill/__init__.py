"""Distillation on the shared trainer (compress/train): a teacher's outputs as the student's targets.

  losses      KD losses over student and teacher logits (or the teacher's top-k): forward and
              reverse KL on temperature-softened distributions, generalized JSD, mixed with CE
  students    students made from the teacher by dropping layers
"""
