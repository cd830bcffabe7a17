"""DeepSpeed behind one wall: the training engine (ZeRO 0-3 over dp x cp) and every DeepSpeed internal it uses."""
