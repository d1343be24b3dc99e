"""Generation-length predictor service: predicts how many tokens each prompt will generate."""
