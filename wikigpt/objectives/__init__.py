"""Training losses: the chunked loss, rare tokens sharing rows, distillation from a teacher."""
