"""What is done with a trained model: inference (model.pt, the eval view, TTA), inputs (listing and
batching new images), predict, evaluate, interpret (the images it gets most wrong), export (ONNX,
TorchScript) and exported (running an exported model)."""
