/* One copy of an x86 kernel file per instruction set, for run-time dispatch from CPUID.
 *
 * The including file (cpu_qdot.c, cpu_ggml.c, compiled without -march=native) defines
 *   WS_X86_KERNELS   the kernel file to copy, e.g. "cpu_qdot_x86.h"
 *   WS_X86_EXTRA     target features every copy adds, e.g. ",f16c" (or "")
 * and gets, on x86-64 with gcc or clang, WS_X86 defined and one copy of the kernel file each for
 * AVX2 (vpmaddubsw + vpmaddwd), AVX512-VNNI (vpdpbusd, with AVX512 F/BW/VL; WS_WIDE512 set: the
 * copy may use 512-bit vectors) and, where the compiler has it, AVX-VNNI (vpdpbusd, VEX encoded:
 * WS_X86_AVXVNNI defined). In each copy:
 *   SUFFIX    the function-name suffix (avx2, avxvnni, avx512vnni): FN(name) is name_SUFFIX
 *   TARGET    the gcc/clang target string its functions are compiled for
 *   DOTU8S8   (acc, u, s): acc (8 x int32) + the sums of 4 adjacent u8 x s8 products
 *   WS_DOT32  defined where DOTU8S8 sums in 32 bits (VNNI): any u8 x s8 products, where AVX2's
 *             16-bit pair sums would saturate past 2 x 255 x 127
 * so each copy uses exactly its TARGET's instructions. */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define WS_X86 1

#define SUFFIX avx2
#define TARGET "avx2,fma" WS_X86_EXTRA
#define DOTU8S8(acc, u, s) \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#include "cpu_x86_common.h"
#include WS_X86_KERNELS
#undef SUFFIX
#undef TARGET
#undef DOTU8S8

#define SUFFIX avx512vnni
#define TARGET "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni" WS_X86_EXTRA
#define DOTU8S8(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#define WS_WIDE512 1
#define WS_DOT32 1
#include "cpu_x86_common.h"
#include WS_X86_KERNELS
#undef WS_DOT32
#undef WS_WIDE512
#undef SUFFIX
#undef TARGET
#undef DOTU8S8

#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define WS_X86_AVXVNNI 1
#define SUFFIX avxvnni
#define TARGET "avx2,fma,avxvnni" WS_X86_EXTRA
#define DOTU8S8(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#define WS_DOT32 1
#include "cpu_x86_common.h"
#include WS_X86_KERNELS
#undef WS_DOT32
#undef SUFFIX
#undef TARGET
#undef DOTU8S8
#endif
#endif
