// lwIP 2.1 (Debian liblwip-dev: NO_SYS=0, LWIP_TCPIP_CORE_LOCKING=1, the unix sys_arch port).
// Only CVioLwIP includes this; Swift code sees CVioLwIP's small API, never lwIP's headers.
#include <lwip/opt.h>
#include <lwip/tcpip.h>
#include <lwip/tcp.h>
#include <lwip/netif.h>
#include <lwip/etharp.h>
#include <lwip/pbuf.h>
#include <netif/ethernet.h>
