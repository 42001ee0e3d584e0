"""Drop-in fused modules, one file per model zoo, each a subclass of the module it replaces.

    vitkernels.nn.timm          Block, SwinTransformerBlock, SwinTransformerV2Block, VisionTransformer,
                                VisionTransformerDistilled
    vitkernels.nn.transformers  ViTLayer, DeiTLayer, SwinLayer, Swinv2Layer, vitkernels_attention
    vitkernels.nn.torchvision   ShiftedWindowAttention(V2), SwinTransformerBlock, EncoderBlock

They add no parameter or buffer, so checkpoints load unchanged both ways. Import the file of a
zoo you have installed; vitkernels.apply(model) swaps them into a built model.
"""
