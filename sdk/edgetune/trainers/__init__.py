"""Trainers that turn local data into an updated adapter, one module per framework.

Importing this package imports no framework: ``edgetune.trainers.torch_lora`` pulls in torch
and PEFT, so a device without PyTorch can still speak the protocol (and, later, use another
backend).
"""
