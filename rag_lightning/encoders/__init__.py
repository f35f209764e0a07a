"""Dense encoders of questions and passages: what an encoder folder is, and building the encoder it holds; used
by both the knowledge-base build (kb/) and the model (model/)."""
