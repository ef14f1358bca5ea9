"""Code both sides share: model, SSL losses, data reading, parameter exchange, privacy maths."""
