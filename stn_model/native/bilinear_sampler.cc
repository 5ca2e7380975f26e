// Bilinear sampling of NHWC images at normalized grid coordinates (PyTorch's grid_sample with
// mode="bilinear"), forward and backward, as TensorFlow CPU ops.
//
//   StnBilinearSample(images [B, H, W, C], grid [B, H', W', 2]) -> output [B, H', W', C]
//   StnBilinearSampleGrad(images, grid, upstream) -> images_grad, grid_grad
//
// Same meaning as the pure-TF path in stn_model/sampling.py: the bilinear weights come from the
// unclipped pixel coordinates; taps outside the image read zero ("zeros"), or the coordinates
// are first clamped to the image ("border"), where the coordinate derivative is zero on and
// beyond the edges. Half types are computed in float. A +-inf coordinate lies outside the
// image; a NaN one samples NaN and has a NaN grid gradient (and adds nothing to images_grad).
//
// Layout: each image is copied (in the compute type) into a buffer with a ring of zeros and one
// more zero row at the bottom. Every point that touches the image then has its four taps inside
// the buffer, and a point that misses it reads the two zero rows at the bottom, so the loops
// have no per-tap branches. The points go in blocks: a first loop locates them (vectorizable),
// a second reads or scatters the taps. The backward pass accumulates into a buffer of the same
// layout, one image at a time, so it shards over the batch without atomics.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace stn {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// float for float and the half types, double for double.
template <typename T>
using Compute = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

constexpr int64_t kBlock = 128;  // points located at a time

// Where a block of points samples: the padded-buffer pixel of each top-left tap, the fractions
// (the unclipped bilinear weights) and the derivatives d pixel / d normalized coordinate.
template <typename S>
struct Block {
  int32_t index[kBlock];
  S fx[kBlock], fy[kBlock], dx[kBlock], dy[kBlock];
};

// The geometry of one images/grid pair; kChannels is the channel count if fixed, else 0.
template <typename S, bool kBorder, int kChannels>
class Sampler {
 public:
  static constexpr S kNaN = std::numeric_limits<S>::quiet_NaN();

  Sampler(const Tensor& images, const Tensor& grid, bool align_corners)
      : height_(images.dim_size(1)),
        width_(images.dim_size(2)),
        channels_(kChannels > 0 ? kChannels : images.dim_size(3)),
        points_(grid.dim_size(1) * grid.dim_size(2)),
        x_(width_, align_corners),
        y_(height_, align_corners) {}

  int64_t channels() const { return kChannels > 0 ? kChannels : channels_; }
  int64_t points() const { return points_; }
  int64_t image_size() const { return height_ * width_ * channels(); }
  int64_t row() const { return (width_ + 2) * channels(); }  // a padded row, in elements
  int64_t padded_size() const { return (height_ + 3) * row(); }

  // Copies image [H, W, C] into padded (padded_size(), zeros around it).
  template <typename T>
  void Pad(const T* image, S* padded) const {
    std::fill(padded, padded + padded_size(), S(0));
    for (int64_t y = 0; y < height_; ++y) {
      const T* from = image + y * width_ * channels();
      std::transform(from, from + width_ * channels(), padded + (y + 1) * row() + channels(),
                     [](T value) { return S(value); });
    }
  }

  // The gradient of the image inside padded, cast into image_grad [H, W, C].
  template <typename T>
  void Unpad(const S* padded, T* image_grad) const {
    for (int64_t y = 0; y < height_; ++y) {
      const S* from = padded + (y + 1) * row() + channels();
      std::transform(from, from + width_ * channels(), image_grad + y * width_ * channels(),
                     [](S value) { return T(value); });
    }
  }

  // Locates the points grid[0 .. count) (x, y interleaved) into block.
  template <typename T>
  void Locate(const T* grid, int64_t count, Block<S>* block) const {
    const int32_t padded_width = static_cast<int32_t>(width_ + 2);
    const int32_t missing = static_cast<int32_t>(height_ + 1) * padded_width;  // zero rows
    for (int64_t k = 0; k < count; ++k) {
      int32_t x0, y0;
      S fx, fy, dx, dy;
      const S x = S(grid[2 * k]), y = S(grid[2 * k + 1]);
      const bool x_in = x_.Locate(x, &x0, &fx, &dx);
      const bool y_in = y_.Locate(y, &y0, &fy, &dy);
      const bool touches = x_in & y_in;
      // A point that misses reads the zero rows with weights 0, or NaN (NaN output and grid
      // gradient) when a coordinate is NaN.
      const S missed = std::isnan(x) | std::isnan(y) ? kNaN : S(0);
      block->index[k] = touches ? (y0 + 1) * padded_width + x0 + 1 : missing;
      block->fx[k] = touches ? fx : missed;
      block->fy[k] = touches ? fy : missed;
      block->dx[k] = touches ? dx : missed;
      block->dy[k] = touches ? dy : missed;
    }
  }

 private:
  // One image axis: normalized coordinate -> pixel coordinate.
  struct Axis {
    Axis(int64_t size, bool align_corners)
        : scale(align_corners ? (S(size) - S(1)) * S(0.5) : S(size) * S(0.5)),
          offset(align_corners ? S(0) : S(0.5)),
          last(S(size - 1)),
          end(S(size)) {}

    // The top-left tap, the unclipped fraction and d pixel / d coord of `coord`; false when
    // no tap of the point lies on this axis of the image.
    bool Locate(S coord, int32_t* tap, S* fraction, S* derivative) const {
      // Every point beyond +-2 clamps to the edge: keep +-inf off the 0 scale of a one-pixel
      // axis under align_corners (inf * 0 is NaN). NaN stays NaN.
      if (kBorder) coord = std::min(std::max(coord, S(-2)), S(2));
      S pixel = (coord + S(1)) * scale - offset;
      *derivative = scale;
      if (kBorder) {
        *derivative = (pixel > S(0)) & (pixel < last) ? scale : S(0);
        pixel = std::min(std::max(pixel, S(0)), last);  // NaN stays NaN
      }
      // floor(pixel) lies in [-1, size - 1] iff pixel lies in [-1, size); false for NaN.
      const bool inside = (pixel >= S(-1)) & (pixel < end);
      const S clamped = std::min(std::max(S(-1), pixel), end);  // NaN -> -1: safe to convert
      int32_t floor = static_cast<int32_t>(clamped);            // towards zero: fix (-1, 0)
      floor -= S(floor) > clamped;
      *tap = floor;
      *fraction = pixel - S(floor);
      return inside;
    }

    S scale, offset, last, end;
  };

  int64_t height_, width_, channels_, points_;
  Axis x_, y_;
};

// Forward for one image: output[points, C] from its padded copy and its grid[points, 2].
template <typename T, typename S, bool kBorder, int kChannels>
void SampleImage(const Sampler<S, kBorder, kChannels>& sampler, const S* padded, const T* grid,
                 T* output) {
  const int64_t channels = sampler.channels(), row = sampler.row();
  Block<S> block;
  for (int64_t start = 0; start < sampler.points(); start += kBlock) {
    const int64_t count = std::min(kBlock, sampler.points() - start);
    sampler.Locate(grid + 2 * start, count, &block);
    T* out = output + start * channels;
    for (int64_t k = 0; k < count; ++k) {
      const S fx = block.fx[k], fy = block.fy[k];
      const S w00 = (S(1) - fx) * (S(1) - fy), w01 = fx * (S(1) - fy);
      const S w10 = (S(1) - fx) * fy, w11 = fx * fy;
      const S* t = padded + block.index[k] * channels;
      for (int64_t c = 0; c < channels; ++c) {
        out[k * channels + c] = T(w00 * t[c] + w01 * t[c + channels] + w10 * t[c + row] +
                                  w11 * t[c + row + channels]);
      }
    }
  }
}

// Backward for one image: accumulates into padded_grad (zeroed by the caller) and writes the
// grid gradient [points, 2].
template <typename T, typename S, bool kBorder, int kChannels>
void SampleGradImage(const Sampler<S, kBorder, kChannels>& sampler, const S* padded,
                     const T* grid, const T* upstream, S* padded_grad, T* grid_grad) {
  const int64_t channels = sampler.channels(), row = sampler.row();
  Block<S> block;
  for (int64_t start = 0; start < sampler.points(); start += kBlock) {
    const int64_t count = std::min(kBlock, sampler.points() - start);
    sampler.Locate(grid + 2 * start, count, &block);
    const T* up = upstream + start * channels;
    T* grid_out = grid_grad + 2 * start;
    for (int64_t k = 0; k < count; ++k) {
      const S fx = block.fx[k], fy = block.fy[k];
      const S w00 = (S(1) - fx) * (S(1) - fy), w01 = fx * (S(1) - fy);
      const S w10 = (S(1) - fx) * fy, w11 = fx * fy;
      const S* t = padded + block.index[k] * channels;
      S* g = padded_grad + block.index[k] * channels;
      S x_grad = 0, y_grad = 0;
      for (int64_t c = 0; c < channels; ++c) {
        const S u = S(up[k * channels + c]);
        const S v00 = t[c], v01 = t[c + channels], v10 = t[c + row], v11 = t[c + row + channels];
        x_grad += u * ((S(1) - fy) * (v01 - v00) + fy * (v11 - v10));
        y_grad += u * ((S(1) - fx) * (v10 - v00) + fx * (v11 - v01));
        g[c] += w00 * u;
        g[c + channels] += w01 * u;
        g[c + row] += w10 * u;
        g[c + row + channels] += w11 * u;
      }
      grid_out[2 * k] = T(x_grad * block.dx[k]);
      grid_out[2 * k + 1] = T(y_grad * block.dy[k]);
    }
  }
}

// Checks images [B, H, W, C] and grid [B, H', W', 2].
::tensorflow::Status CheckInputs(const Tensor& images, const Tensor& grid) {
  using ::tensorflow::errors::InvalidArgument;
  if (images.dims() != 4) {
    return InvalidArgument("images must have shape [B, H, W, C], got ",
                           images.shape().DebugString());
  }
  if (grid.dims() != 4 || grid.dim_size(3) != 2) {
    return InvalidArgument("grid must have shape [B, H', W', 2], got ",
                           grid.shape().DebugString());
  }
  if (images.dim_size(0) != grid.dim_size(0)) {
    return InvalidArgument("images and grid must have the same batch size, got ",
                           images.shape().DebugString(), " and ", grid.shape().DebugString());
  }
  if (images.dim_size(1) == 0 || images.dim_size(2) == 0) {
    return InvalidArgument("images must have a positive height and width, got ",
                           images.shape().DebugString());
  }
  if ((images.dim_size(1) + 3) * (images.dim_size(2) + 2) > INT32_MAX) {
    return InvalidArgument("images are too large to sample: ", images.shape().DebugString());
  }
  return ::tensorflow::OkStatus();
}

// Runs work(begin, end) over [0, total) on the CPU worker pool.
template <typename Work>
void Parallel(OpKernelContext* context, int64_t total, int64_t cost_per_unit, Work work) {
  const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
  ::tensorflow::Shard(workers.num_threads, workers.workers, total, cost_per_unit, work);
}

// What both kernels share: the attributes, and the Sampler specialised for them.
class SamplerKernel : public OpKernel {
 protected:
  explicit SamplerKernel(OpKernelConstruction* context) : OpKernel(context) {
    std::string padding_mode;
    OP_REQUIRES_OK(context, context->GetAttr("padding_mode", &padding_mode));
    OP_REQUIRES_OK(context, context->GetAttr("align_corners", &align_corners_));
    border_ = padding_mode == "border";
  }

  // Calls fn(sampler) with the Sampler for this padding mode and the channel count of images.
  template <typename S, typename Fn>
  void WithSampler(const Tensor& images, const Tensor& grid, Fn fn) const {
    if (border_) {
      WithChannels<S, true>(images, grid, fn);
    } else {
      WithChannels<S, false>(images, grid, fn);
    }
  }

 private:
  template <typename S, bool kBorder, typename Fn>
  void WithChannels(const Tensor& images, const Tensor& grid, Fn fn) const {
    if (images.dim_size(3) == 1) {
      fn(Sampler<S, kBorder, 1>(images, grid, align_corners_));
    } else {
      fn(Sampler<S, kBorder, 0>(images, grid, align_corners_));
    }
  }

  bool border_ = false;
  bool align_corners_ = false;
};

template <typename T>
class SampleOp : public SamplerKernel {
 public:
  explicit SampleOp(OpKernelConstruction* context) : SamplerKernel(context) {}

  void Compute(OpKernelContext* context) override {
    using S = stn::Compute<T>;
    const Tensor& images = context->input(0);
    const Tensor& grid = context->input(1);
    OP_REQUIRES_OK(context, CheckInputs(images, grid));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(
                                0,
                                {grid.dim_size(0), grid.dim_size(1), grid.dim_size(2),
                                 images.dim_size(3)},
                                &output));
    const T* image_data = images.flat<T>().data();
    const T* grid_data = grid.flat<T>().data();
    T* output_data = output->flat<T>().data();
    WithSampler<S>(images, grid, [&](const auto& sampler) {
      const int64_t points = sampler.points(), channels = sampler.channels();
      const int64_t cost = sampler.padded_size() + points * (30 + 10 * channels);
      Parallel(context, images.dim_size(0), cost, [&](int64_t begin, int64_t end) {
        std::vector<S> padded(sampler.padded_size());
        for (int64_t b = begin; b < end; ++b) {
          sampler.Pad(image_data + b * sampler.image_size(), padded.data());
          SampleImage(sampler, padded.data(), grid_data + b * points * 2,
                      output_data + b * points * channels);
        }
      });
    });
  }
};

template <typename T>
class SampleGradOp : public SamplerKernel {
 public:
  explicit SampleGradOp(OpKernelConstruction* context) : SamplerKernel(context) {}

  void Compute(OpKernelContext* context) override {
    using S = stn::Compute<T>;
    const Tensor& images = context->input(0);
    const Tensor& grid = context->input(1);
    const Tensor& upstream = context->input(2);
    OP_REQUIRES_OK(context, CheckInputs(images, grid));
    const ::tensorflow::TensorShape output_shape(
        {grid.dim_size(0), grid.dim_size(1), grid.dim_size(2), images.dim_size(3)});
    OP_REQUIRES(context, upstream.shape() == output_shape,
                ::tensorflow::errors::InvalidArgument(
                    "upstream must have shape ", output_shape.DebugString(), ", got ",
                    upstream.shape().DebugString()));
    Tensor* images_grad = nullptr;
    Tensor* grid_grad = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, images.shape(), &images_grad));
    OP_REQUIRES_OK(context, context->allocate_output(1, grid.shape(), &grid_grad));
    const T* image_data = images.flat<T>().data();
    const T* grid_data = grid.flat<T>().data();
    const T* upstream_data = upstream.flat<T>().data();
    T* images_grad_data = images_grad->flat<T>().data();
    T* grid_grad_data = grid_grad->flat<T>().data();
    // images_grad[b] only receives from the points of image b: shard over the batch.
    WithSampler<S>(images, grid, [&](const auto& sampler) {
      const int64_t points = sampler.points(), channels = sampler.channels();
      const int64_t cost = 3 * sampler.padded_size() + points * (40 + 20 * channels);
      Parallel(context, images.dim_size(0), cost, [&](int64_t begin, int64_t end) {
        std::vector<S> padded(sampler.padded_size()), padded_grad(sampler.padded_size());
        for (int64_t b = begin; b < end; ++b) {
          sampler.Pad(image_data + b * sampler.image_size(), padded.data());
          std::fill(padded_grad.begin(), padded_grad.end(), S(0));
          SampleGradImage(sampler, padded.data(), grid_data + b * points * 2,
                          upstream_data + b * points * channels, padded_grad.data(),
                          grid_grad_data + b * points * 2);
          sampler.Unpad(padded_grad.data(), images_grad_data + b * sampler.image_size());
        }
      });
    });
  }
};

::tensorflow::Status SampleShape(InferenceContext* c) {
  ShapeHandle images, grid;
  DimensionHandle batch, two;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &images));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &grid));
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(grid, 3), 2, &two));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(images, 0), c->Dim(grid, 0), &batch));
  c->set_output(0, c->MakeShape({batch, c->Dim(grid, 1), c->Dim(grid, 2), c->Dim(images, 3)}));
  return ::tensorflow::OkStatus();
}

::tensorflow::Status SampleGradShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(SampleShape(c));
  ShapeHandle upstream;
  TF_RETURN_IF_ERROR(c->Merge(c->input(2), c->output(0), &upstream));
  c->set_output(0, c->input(0));
  c->set_output(1, c->input(1));
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("StnBilinearSample")
    .Input("images: T")
    .Input("grid: T")
    .Output("output: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("padding_mode: {'zeros', 'border'} = 'zeros'")
    .Attr("align_corners: bool = false")
    .SetShapeFn(SampleShape)
    .Doc("Bilinear sample of images [B, H, W, C] at grid [B, H', W', 2] -> [B, H', W', C].");

REGISTER_OP("StnBilinearSampleGrad")
    .Input("images: T")
    .Input("grid: T")
    .Input("upstream: T")
    .Output("images_grad: T")
    .Output("grid_grad: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("padding_mode: {'zeros', 'border'} = 'zeros'")
    .Attr("align_corners: bool = false")
    .SetShapeFn(SampleGradShape)
    .Doc("Gradients of StnBilinearSample with respect to images and grid.");

#define STN_REGISTER_KERNELS(T)                                                               \
  REGISTER_KERNEL_BUILDER(                                                                    \
      Name("StnBilinearSample").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),      \
      SampleOp<T>);                                                                           \
  REGISTER_KERNEL_BUILDER(                                                                    \
      Name("StnBilinearSampleGrad").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),  \
      SampleGradOp<T>);

STN_REGISTER_KERNELS(Eigen::half);
STN_REGISTER_KERNELS(Eigen::bfloat16);
STN_REGISTER_KERNELS(float);
STN_REGISTER_KERNELS(double);

#undef STN_REGISTER_KERNELS

}  // namespace stn
