"""The data featinv trains and measures on: the procedural shapes dataset with every seed named
once (:mod:`featinv.data.shapes`), its training stream and the batch draw every stream shares
(:mod:`featinv.data.streams`), and folders of images in ImageNet layout
(:mod:`featinv.data.image_folder`)."""
