"""The defaults of `embed`'s sample options, in a module that imports nothing, so that the command line
states them in its help without importing the readers (webdataset, pyarrow)."""

IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')  # webdataset image keys, first found wins
CAPTION_KEY = 'txt'
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own guard against decompression bombs
MAX_RESIZED_PIXELS = 4096 * 4096  # an aspect ratio of about 330:1 at 224 px
