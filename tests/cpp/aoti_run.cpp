// Runs an AOTInductor package (torch._inductor.aoti_compile_and_package) from C++, with LibTorch only:
// no Python. Used by tests/test_aoti.py (eval packages: plain ATen, nothing of fused_resnet) and
// tests/test_aoti_train.py (training packages, which call fused_resnet's ops: `--load` the library
// fused_resnet/_C_ops.so that defines them, as any C++ program would).
//   aoti_run [--load <library.so>] <model.pt2> <input.bin> <output.bin> <dim0> [<dim1> ...]
// The input is raw float32 in C order with the given shape; the first output is written the same way,
// and its shape is printed on stdout ("shape d0 d1 ...").
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/version.h>

#include <dlfcn.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc > 2 && std::string(argv[1]) == "--load") {
    // RTLD_GLOBAL is not needed (the ops register with the dispatcher when the library loads); the
    // handle is kept open for the life of the process.
    void* library = dlopen(argv[2], RTLD_NOW);
    if (library == nullptr) {
      std::cerr << "could not load " << argv[2] << ": " << dlerror() << "\n";
      return 1;
    }
    // fused_resnet's library records the torch it was built against: its C++ ABI is that torch's only.
    using Version = const char* (*)();
    if (auto built = reinterpret_cast<Version>(dlsym(library, "fused_resnet_torch_version"));
        built != nullptr && std::string(built()) != TORCH_VERSION) {
      std::cerr << argv[2] << " was built against torch " << built() << ", this program runs LibTorch "
                << TORCH_VERSION << ": rebuild it\n";
      return 1;
    }
    argv += 2;
    argc -= 2;
  }
  if (argc < 5) {
    std::cerr << "usage: aoti_run [--load library.so] model.pt2 input.bin output.bin dim0 [dim1 ...]\n";
    return 2;
  }
  std::vector<int64_t> shape;
  for (int i = 4; i < argc; ++i) shape.push_back(std::atoll(argv[i]));
  at::Tensor x = at::empty(shape, at::kFloat);
  std::ifstream in(argv[2], std::ios::binary);
  in.read(reinterpret_cast<char*>(x.data_ptr<float>()), x.numel() * sizeof(float));
  if (!in) {
    std::cerr << "could not read " << x.numel() << " floats from " << argv[2] << "\n";
    return 1;
  }
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::vector<at::Tensor> outputs = loader.run({x});
  at::Tensor y = outputs.at(0).contiguous().to(at::kFloat);
  std::ofstream out(argv[3], std::ios::binary);
  out.write(reinterpret_cast<const char*>(y.data_ptr<float>()), y.numel() * sizeof(float));
  std::cout << "shape";
  for (int64_t d : y.sizes()) std::cout << " " << d;
  std::cout << std::endl;
  return out ? 0 : 1;
}
