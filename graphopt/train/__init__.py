"""Training for graphopt: knowledge distillation with ONNX Runtime's on-device training API.

``env`` finds or creates the training environment (onnxruntime-training 1.19.2 cannot share graphopt's),
``prepare`` makes a student trainable by it, ``kd`` stages data and teacher outputs and drives the
``worker``, which builds the graphs (``artifacts``, ``loss``) and trains, in that environment or in-process.
"""
