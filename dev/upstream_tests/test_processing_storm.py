"""Harness (not part of storm-transformers): transformers' ProcessorTesterMixin against StormProcessor."""
import os
import unittest

from transformers import AutoTokenizer, SiglipImageProcessor

from storm_transformers import StormProcessor, StormVideoProcessor
from storm_transformers.conversion.assets import QWEN2_GGUF
from storm_transformers.conversion.checkpoint import add_placeholder_tokens

from ...test_processing_common import ProcessorTesterMixin

SIZE = {"height": 32, "width": 32}
K = int(os.environ.get("STORM_HARNESS_K", "2"))  # temporal_pool_size; STORM_HARNESS_K=1 runs the odd-frame test


class StormProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = StormProcessor

    @classmethod
    def _setup_tokenizer(cls):
        tokenizer = AutoTokenizer.from_pretrained(os.environ["STORM_ASSETS"] + "/tokenizer", gguf_file=QWEN2_GGUF)
        add_placeholder_tokens(tokenizer)
        return tokenizer

    @classmethod
    def _setup_image_processor(cls):
        return SiglipImageProcessor(size=SIZE)

    @classmethod
    def _setup_video_processor(cls):
        return StormVideoProcessor(size=SIZE, num_frames=4)

    @staticmethod
    def prepare_processor_dict():
        # the tiny model's settings: patch 8 on 32 px, 2x2 space-to-channel -> 2x2 grid, temporal pooling k=2
        return {"patch_size": 8, "downsample_factor": 2, "temporal_pool_size": K}

    @property
    def video_sampling_expectations(self):
        # STORM samples 4 frames by default (num_frames=4 here) and keeps fps counts a multiple of k=2; the fixture
        # tiny_video_320x240.mp4 has 12 frames at 10 fps (1.2 s)
        return [
            {"num_frames": 4, "fps": None, "expected_dim": 1, "output_length": 4},
            {"num_frames": None, "fps": 5, "expected_dim": 1, "output_length": 6},
            {"do_sample_frames": False, "fps": 10, "expected_dim": 1, "output_length": 12},
            {"do_sample_frames": False, "expected_dim": 1, "output_length": 12},
            {"expected_dim": 1, "output_length": 4},
        ]

    @unittest.skipIf(
        K > 1,
        "Not shared with LLaVA-OV (no temporal pooling there): the mixin slices both videos to 7 frames "
        "(video_inputs[0][:7]) with do_sample_frames=False and no hook for the tester's inputs; with temporal "
        "pooling k=2 STORM needs a multiple of k frames and raises ValueError by design. Passes with STORM_HARNESS_K=1.",
    )
    def test_get_num_multimodal_tokens_matches_processor_call_video(self):
        super().test_get_num_multimodal_tokens_matches_processor_call_video()

    def test_get_num_multimodal_tokens_matches_processor_call(self):
        """Not shared with LLaVA-OV: the mixin of transformers 5.25 also loads the image processor at twice the
        tester's size and passes the tester's size at call time. STORM's processor refuses frames whose size is not
        image_processor.size (the vision tower's input, whose position embeddings fix it) with a ValueError that
        names the fix, by design; so here only the mixin's checks at the image processor's own size, for both
        backends, flat and nested."""
        if not hasattr(self, "_check_num_image_tokens_match_processor_call"):  # the mixin before 5.25: as it is
            return super().test_get_num_multimodal_tokens_matches_processor_call()
        from transformers import AutoImageProcessor

        for backend in ("torchvision", "pil"):
            with self.subTest(backend=backend):
                image_processor = AutoImageProcessor.from_pretrained(self.tmpdirname, backend=backend)
                processor = self.processor_class.from_pretrained(self.tmpdirname, image_processor=image_processor)
                kwargs = dict(self.num_image_tokens_images_kwargs)
                self._check_num_image_tokens_match_processor_call(processor, **kwargs)
                self._check_num_image_tokens_match_processor_call(processor, images_kwargs=kwargs)
