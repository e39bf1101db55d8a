"""Harness (not part of storm-transformers): transformers' VideoProcessingTestMixin against StormVideoProcessor,
modelled on LLaVA-OneVision's video processing test."""
import unittest

from storm_transformers import StormVideoProcessor

from ...test_video_processing_common import VideoProcessingTestMixin, prepare_video_inputs


class StormVideoProcessingTester:
    def __init__(self, parent, batch_size=5, num_frames=8, num_channels=3, min_resolution=30, max_resolution=400):
        self.parent = parent
        self.batch_size = batch_size
        self.num_frames = num_frames
        self.num_channels = num_channels
        self.min_resolution = min_resolution
        self.max_resolution = max_resolution
        self.size = {"height": 20, "width": 20}  # STORM scans a square grid: square sizes only

    def prepare_video_processor_dict(self):
        return {
            "do_resize": True,
            "size": self.size,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "do_convert_rgb": True,
            "num_frames": self.num_frames,  # STORM samples num_frames uniformly by default (32 in the class)
        }

    def expected_output_video_shape(self, videos):
        return self.num_frames, self.num_channels, self.size["height"], self.size["width"]

    def prepare_video_inputs(self, equal_resolution=False, return_tensors="pil"):
        return prepare_video_inputs(
            batch_size=self.batch_size,
            num_frames=self.num_frames,
            num_channels=self.num_channels,
            min_resolution=self.min_resolution,
            max_resolution=self.max_resolution,
            equal_resolution=equal_resolution,
            return_tensors=return_tensors,
        )


class StormVideoProcessingTest(VideoProcessingTestMixin, unittest.TestCase):
    fast_video_processing_class = StormVideoProcessor

    def setUp(self):
        super().setUp()
        self.video_processor_tester = StormVideoProcessingTester(self)

    @property
    def video_processor_dict(self):
        return self.video_processor_tester.prepare_video_processor_dict()

    # Overridden as LLaVA-OV overrides it: the mixin's version assumes shortest_edge/crop_size sizes
    def test_video_processor_from_dict_with_kwargs(self):
        video_processor = self.fast_video_processing_class.from_dict(self.video_processor_dict)
        self.assertEqual(video_processor.size, {"height": 20, "width": 20})
        video_processor = self.fast_video_processing_class.from_dict(self.video_processor_dict, size=42)
        self.assertEqual(video_processor.size, {"height": 42, "width": 42})
