// The arithmetic counter of the CUDA emulation: a clang plugin (an LLVM pass) that the emulated
// kernel files are compiled with (-fpass-plugin), so that the counters (counters.cpp) know how much
// arithmetic each kernel does, by kind, as the compiled code executes it.
//
// It runs after the optimiser, on the code that will execute, and counts each basic block's
// floating-point work once, at compile time: fadd, fsub, fmul, fdiv and frem 1 each, fma and
// fmuladd 2 (a fused multiply-add is two FLOPs, as peaks count it), square roots, exponentials,
// logarithms, powers and trigonometric functions (the intrinsics and the C library calls) 1 special
// function each; a vector instruction counts once per lane; float and double apart (f32, f64).
// Comparisons, min/max, negation, conversions and integer work are not counted. At the top of each
// block that has any, it inserts
//     if (rex_emulation_counting_arithmetic) rex_emulation_count_arithmetic(f32, f64, special);
// so a thread pays one load and one branch per such block when no interval counts, and the
// counters add the block's work to the running kernel when one does (host code in the same files
// is ignored there). The flag's load carries !nosanitize, so AddressSanitizer does not check it.
#include <llvm/IR/IRBuilder.h>
#include <llvm/IR/Instructions.h>
#include <llvm/IR/IntrinsicInst.h>
#include <llvm/IR/Module.h>
#include <llvm/IR/PassManager.h>
#include <llvm/Passes/PassBuilder.h>
#include <llvm/Passes/PassPlugin.h>
#include <llvm/Transforms/Utils/BasicBlockUtils.h>

#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

namespace {

struct Arithmetic {
  uint64_t f32 = 0, f64 = 0, special = 0;
  bool any() const { return f32 + f64 + special != 0; }
};

uint64_t lanes(const llvm::Type* type) {
  if (const auto* vector = llvm::dyn_cast<llvm::FixedVectorType>(type))
    return vector->getNumElements();
  return 1;
}

// `operations` FLOPs per lane of a value of `type`, if it is float or double.
void add_flops(Arithmetic& a, const llvm::Type* type, uint64_t operations) {
  const llvm::Type* scalar = type->getScalarType();
  if (scalar->isFloatTy()) a.f32 += operations * lanes(type);
  if (scalar->isDoubleTy()) a.f64 += operations * lanes(type);
}

bool is_special_intrinsic(llvm::Intrinsic::ID id) {
  switch (id) {
    case llvm::Intrinsic::sqrt:
    case llvm::Intrinsic::exp:
    case llvm::Intrinsic::exp2:
    case llvm::Intrinsic::log:
    case llvm::Intrinsic::log2:
    case llvm::Intrinsic::log10:
    case llvm::Intrinsic::pow:
    case llvm::Intrinsic::powi:
    case llvm::Intrinsic::sin:
    case llvm::Intrinsic::cos:
      return true;
    default:
      return false;
  }
}

bool is_special_library_call(std::string_view name) {
  for (const std::string_view base : {"sqrt", "exp", "exp2", "expm1", "log", "log2", "log10",
                                      "log1p", "pow", "sin", "cos", "tan", "tanh", "erf", "erfc"})
    if (name == base || (name.size() == base.size() + 1 && name.substr(0, base.size()) == base &&
                         name.back() == 'f'))
      return true;
  return false;
}

Arithmetic count_block(const llvm::BasicBlock& block) {
  Arithmetic a;
  for (const llvm::Instruction& instruction : block) {
    switch (instruction.getOpcode()) {
      case llvm::Instruction::FAdd:
      case llvm::Instruction::FSub:
      case llvm::Instruction::FMul:
      case llvm::Instruction::FDiv:
      case llvm::Instruction::FRem:
        add_flops(a, instruction.getType(), 1);
        continue;
      default:
        break;
    }
    const auto* call = llvm::dyn_cast<llvm::CallBase>(&instruction);
    const llvm::Function* callee = call ? call->getCalledFunction() : nullptr;
    if (callee == nullptr) continue;
    const llvm::Intrinsic::ID id = callee->getIntrinsicID();
    if (id == llvm::Intrinsic::fma || id == llvm::Intrinsic::fmuladd) {
      add_flops(a, call->getType(), 2);
    } else if (is_special_intrinsic(id) || (id == llvm::Intrinsic::not_intrinsic &&
                                            is_special_library_call(callee->getName().str()))) {
      a.special += lanes(call->getType());
    }
  }
  return a;
}

struct CountArithmetic : llvm::PassInfoMixin<CountArithmetic> {
  llvm::PreservedAnalyses run(llvm::Module& module, llvm::ModuleAnalysisManager&) {
    llvm::LLVMContext& context = module.getContext();
    llvm::Type* byte = llvm::Type::getInt8Ty(context);
    llvm::Type* count = llvm::Type::getInt64Ty(context);
    llvm::Constant* flag = module.getOrInsertGlobal("rex_emulation_counting_arithmetic", byte);
    const llvm::FunctionCallee counter = module.getOrInsertFunction(
        "rex_emulation_count_arithmetic", llvm::Type::getVoidTy(context), count, count, count);

    std::vector<std::pair<llvm::BasicBlock*, Arithmetic>> blocks;
    for (llvm::Function& function : module)
      for (llvm::BasicBlock& block : function)
        if (const Arithmetic a = count_block(block);
            a.any() && block.getFirstInsertionPt() != block.end())
          blocks.emplace_back(&block, a);
    for (const auto& [block, a] : blocks) {
      llvm::IRBuilder<> at_top(&*block->getFirstInsertionPt());
      llvm::LoadInst* counting = at_top.CreateLoad(byte, flag);
      counting->setMetadata("nosanitize", llvm::MDNode::get(context, {}));
      llvm::Instruction* then = llvm::SplitBlockAndInsertIfThen(
          at_top.CreateICmpNE(counting, at_top.getInt8(0)), &*at_top.GetInsertPoint(), false);
      llvm::IRBuilder<> in_then(then);
      in_then.CreateCall(
          counter, {in_then.getInt64(a.f32), in_then.getInt64(a.f64), in_then.getInt64(a.special)});
    }
    return blocks.empty() ? llvm::PreservedAnalyses::all() : llvm::PreservedAnalyses::none();
  }
};

}  // namespace

extern "C" LLVM_ATTRIBUTE_WEAK llvm::PassPluginLibraryInfo llvmGetPassPluginInfo() {
  return {LLVM_PLUGIN_API_VERSION, "rex-count-arithmetic", "1", [](llvm::PassBuilder& builder) {
            builder.registerOptimizerLastEPCallback(
                [](llvm::ModulePassManager& passes, llvm::OptimizationLevel) {
                  passes.addPass(CountArithmetic());
                });
          }};
}
