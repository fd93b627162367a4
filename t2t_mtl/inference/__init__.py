"""Using a trained run: prompting, predicting files, exporting a merged model."""
