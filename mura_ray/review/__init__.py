"""Jobs that review a model or the nights: evaluation reports, explanations, the nightly monitor."""
