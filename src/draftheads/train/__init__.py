"""Training: self-distillation data (`distill`), tokenised conversations (`data`), Medusa-1 heads (`trainer`)."""
